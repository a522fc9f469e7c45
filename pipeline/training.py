"""The trainer: one SAE fed from a plain stream of activation batches, plus ``train(cfg)`` which
wires a cache, the loader and the trainer together.

The recipe, top to bottom (per step ``t`` of ``T = ceil(training_tokens / train_batch_size_tokens)``):

1. ``x`` ← next loader batch ``[batch, d_in]``, multiplied by the normalisation scale
   ``s = sqrt(d_in) / E||x||`` (``normalize_activations: expected_average_only_in``, as in SAELens;
   ``E||x||`` is the cache's recorded mean norm over non-special tokens), so every hook and model
   trains at the same loss scale. The scale is folded into the saved weights.
2. loss ← ``sae.training_loss(x, sparsity_coefficient=λ_t, dead_mask)``: MSE plus the architecture's
   own terms (see each module of :mod:`pipeline.sae`): an L1 (standard, gated) or L0 (jumprelu)
   penalty whose coefficient is warmed up over ``l1_warm_up_steps`` / ``l0_warm_up_steps``, or
   AuxK (TopK family) / ghost grads (standard) on the latents dead for ``dead_feature_window`` steps.
3. The global gradient norm is clipped to ``max_grad_norm`` (1.0, as SAELens's trainer does), then an
   Adam step with learning rate ``lr`` warmed up linearly over ``lr_warm_up_steps`` and decayed
   linearly to 0 over the last ``lr_decay_steps`` (or cosine-annealed to lr/10 for
   ``lr_scheduler_name: cosineannealing``); the SAE's own hooks keep W_dec rows unit norm where the
   architecture asks for it.
4. Every ``log_every`` steps a JSON line of losses, L0, explained variance, dead/dense counts, lr
   and tokens/s goes to ``metrics.jsonl`` (and to W&B under SAELens's names when asked, see
   :mod:`pipeline.tracking`); a NaN/Inf loss stops training with the step and statistics.
5. Optionally, dead latents are resampled every ``feature_sampling_window`` steps, and
   ``n_checkpoints`` checkpoints are written (:mod:`pipeline.checkpoint`) from which a run resumes
   exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.cache import ActivationCache
from pipeline.checkpoint import (check_resumable, check_same_cache, checkpoint_folder, list_checkpoints,
                                 load_checkpoint_state, resolve_checkpoint, save_checkpoint)
from pipeline.config import ARCHITECTURE_FIELDS, TrainConfig
from pipeline.constants import (METRICS_LOG_FILENAME, SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME,
                                TRAIN_CONFIG_FILENAME)
from pipeline.errors import ConfigError, TrainingError
from pipeline.loader import ActivationLoader
from pipeline.sae import SAE, SAEConfig, get_architecture
from pipeline.sae.topk import geometric_median
from pipeline.tracking import MetricsLogger


def lr_multiplier(step: int, total_steps: int, warm_up_steps: int, decay_steps: int, scheduler: str) -> float:
    """Learning-rate factor at ``step`` (0-based): linear warm-up, then constant or cosine, then decay.

    * warm-up: ``(step + 1) / warm_up_steps`` for the first ``warm_up_steps`` steps;
    * ``constant``: 1, then linear decay to 0 over the last ``decay_steps`` steps
      (the April 2024 Anthropic update decays over the last 20%);
    * ``cosineannealing``: ``0.1 + 0.9 · (1 + cos(π·p)) / 2`` with ``p`` the post-warm-up progress
      (ends at lr/10, SAELens's default ``lr_end``).
    """
    if warm_up_steps and step < warm_up_steps:
        return (step + 1) / warm_up_steps
    if scheduler == "cosineannealing":
        p = (step - warm_up_steps) / max(1, total_steps - warm_up_steps)
        return 0.1 + 0.9 * (1 + math.cos(math.pi * min(1.0, p))) / 2
    remaining = total_steps - step
    if decay_steps and remaining <= decay_steps:
        return remaining / decay_steps
    return 1.0


def activation_scale(mean_norm: float, d_in: int, method: str) -> float:
    """Scale ``s`` with ``E||s·x|| = sqrt(d_in)`` (SAELens ``expected_average_only_in``), or 1."""
    if method == "none":
        return 1.0
    if not mean_norm > 0:
        raise TrainingError(f"the cache's mean activation norm is {mean_norm}; cannot normalise activations.")
    return math.sqrt(d_in) / mean_norm


@dataclass
class TrainerState:
    """What the trainer tracks between steps (per SAE); saved in checkpoints."""

    step: int = 0
    tokens_seen: int = 0
    steps_since_fired: torch.Tensor | None = None  # [d_sae] int64
    window_fire_counts: torch.Tensor | None = None  # [d_sae] float64, over feature_sampling_window
    window_tokens: int = 0
    feature_density: torch.Tensor | None = None  # [d_sae], fraction of tokens each latent fired on
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Tensors and plain values only (``torch.load(weights_only=True)`` reads it back)."""
        return {name: getattr(self, name) for name in
                ("step", "tokens_seen", "steps_since_fired", "window_fire_counts", "window_tokens",
                 "feature_density")}


class Trainer:
    """Trains one SAE from an iterable of ``[batch, d_in]`` float32 batches (already scaled).

    The trainer knows nothing of where batches come from; it owns the optimiser, the schedules,
    dead/dense-latent tracking, dead-latent resampling, checkpoints (through ``on_checkpoint``)
    and logging (through ``logger``, a :class:`~pipeline.tracking.MetricsLogger`).
    """

    def __init__(self, sae: SAE, cfg: TrainConfig, logger: MetricsLogger | None = None,
                 on_checkpoint: Callable[[Trainer], None] | None = None):
        self.sae = sae
        self.cfg = cfg
        self.logger = logger
        self.on_checkpoint = on_checkpoint
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
        d_sae = sae.cfg.d_sae
        self.state = TrainerState(
            steps_since_fired=torch.zeros(d_sae, dtype=torch.int64),
            window_fire_counts=torch.zeros(d_sae, dtype=torch.float64),
        )
        n = cfg.n_checkpoints
        self.checkpoint_steps = {i * cfg.total_steps // n for i in range(1, n + 1)} if n else set()

    def sparsity_coefficient(self, step: int) -> float:
        """λ_t = coefficient · min(1, (t+1) / warm_up) (SAELens's warm-up), with the coefficient and
        warm-up fields the architecture names (``l1_*`` or ``l0_*``); 0 for the TopK family."""
        name, warm_name = self.sae.sparsity_coefficient_name, self.sae.sparsity_warm_up_name
        if name is None:
            return 0.0
        warm = getattr(self.cfg, warm_name) if warm_name else 0
        return getattr(self.cfg, name) * (min(1.0, (step + 1) / warm) if warm else 1.0)

    def dead_mask(self) -> torch.Tensor:
        """Latents that have not fired for ``dead_feature_window`` steps: ``[d_sae]`` bool."""
        return self.state.steps_since_fired >= self.cfg.dead_feature_window

    def step(self, x: torch.Tensor) -> dict[str, float]:
        """One optimisation step on ``x`` ``[batch, d_in]``; returns the step's scalar metrics.

        Raises:
            TrainingError: the loss is NaN or Inf (names the step and the loss parts).
        """
        cfg, st = self.cfg, self.state
        mult = lr_multiplier(st.step, cfg.total_steps, cfg.lr_warm_up_steps, cfg.lr_decay_steps,
                             cfg.lr_scheduler_name)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * mult
        coefficient = self.sparsity_coefficient(st.step)
        out = self.sae.training_loss(x, sparsity_coefficient=coefficient, dead_mask=self.dead_mask())
        if not torch.isfinite(out.loss):
            raise TrainingError(
                f"loss became {out.loss.item()} at step {st.step} (mse {float(out.mse_loss):.4g}, "
                f"sparsity {float(out.sparsity_loss):.4g}, max |x| {x.abs().max().item():.4g}); "
                "lower lr or check the cache with `sae-pipeline cache info`."
            )
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.sae.before_optimizer_step()
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.sae.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.sae.after_optimizer_step()
        counts = self.sae.firing_counts(out).to(torch.float64)
        self._track_firing(counts, x.shape[0])
        st.step += 1
        st.tokens_seen += x.shape[0]
        if cfg.resample_dead_latents and st.step % cfg.feature_sampling_window == 0:
            resample_dead_latents(self, x, out.sae_out)
        return {
            "loss": out.loss.item(),
            "mse_loss": float(out.mse_loss),
            "sparsity_loss": float(out.sparsity_loss),
            "aux_loss": float(out.aux_loss),
            "l0": counts.sum().item() / x.shape[0],
            "explained_variance": _batch_explained_variance(x, out.sae_out.detach()),
            "lr": cfg.lr * mult,
            "sparsity_coefficient": coefficient,
            **out.extra,
        }

    def _track_firing(self, counts: torch.Tensor, n_tokens: int) -> None:
        st = self.state
        fired = counts > 0
        st.steps_since_fired += 1
        st.steps_since_fired[fired] = 0
        st.window_fire_counts += counts
        st.window_tokens += n_tokens
        if st.step % self.cfg.feature_sampling_window == self.cfg.feature_sampling_window - 1:
            self._close_window()

    def _close_window(self) -> None:
        st = self.state
        if st.window_tokens:
            st.feature_density = (st.window_fire_counts / st.window_tokens).float()
        st.window_fire_counts.zero_()
        st.window_tokens = 0

    def latent_statistics(self) -> dict[str, float]:
        """Dead/dense latent counts and the rolling density summary SAELens logs.

        ``dead_features``: silent for ``dead_feature_window`` steps; ``dense_features``: firing
        on more than ``dense_feature_threshold`` of the tokens of the last full
        ``feature_sampling_window``; ``below_1e-5``/``below_1e-6``: latents under those
        densities; ``mean_log10_feature_sparsity``: mean of ``log10(density + 1e-10)``.
        """
        st, cfg = self.state, self.cfg
        stats = {"dead_features": int(self.dead_mask().sum()),
                 "dead_fraction": self.dead_mask().float().mean().item(),
                 "mean_passes_since_fired": st.steps_since_fired.float().mean().item()}
        if st.feature_density is not None:
            density = st.feature_density
            stats.update({"dense_features": int((density > cfg.dense_feature_threshold).sum()),
                          "below_1e-5": int((density < 1e-5).sum()), "below_1e-6": int((density < 1e-6).sum()),
                          "mean_log10_feature_sparsity": torch.log10(density + 1e-10).mean().item()})
        return stats

    def _record(self, metrics: dict[str, float], elapsed: float) -> dict[str, Any]:
        st = self.state
        return {"step": st.step, "tokens": st.tokens_seen, **metrics, **self.latent_statistics(),
                "tokens_per_second": self._tokens_this_run / elapsed if elapsed else 0.0}

    def fit(self, batches: Iterable[torch.Tensor], *, progress: bool = True) -> TrainerState:
        """Run until ``cfg.total_steps`` (fewer if ``batches`` runs out), from ``state.step``."""
        cfg, st = self.cfg, self.state
        bar = tqdm(total=cfg.total_steps * cfg.train_batch_size_tokens, initial=st.tokens_seen, unit="tok",
                   unit_scale=True, desc=f"train {cfg.architecture}", disable=not progress, dynamic_ncols=True)
        t0, self._tokens_this_run = time.perf_counter(), 0
        with bar:
            for x in batches:
                if st.step >= cfg.total_steps:
                    break
                metrics = self.step(x)
                self._tokens_this_run += x.shape[0]
                bar.update(x.shape[0])
                self._emit(metrics, time.perf_counter() - t0, bar)
                if st.step in self.checkpoint_steps and self.on_checkpoint is not None:
                    self.on_checkpoint(self)
        if st.window_tokens:
            self._close_window()
        return st

    def _emit(self, metrics: dict[str, float], elapsed: float, bar) -> None:
        """Log to JSON lines every ``log_every`` steps and to W&B every ``wandb_log_frequency``."""
        st, cfg = self.state, self.cfg
        last = st.step == cfg.total_steps
        to_file = st.step % cfg.log_every == 0 or last
        to_wandb = cfg.log_to_wandb and (st.step % cfg.wandb_log_frequency == 0 or last)
        if not (to_file or to_wandb):
            return
        record = self._record(metrics, elapsed)
        if to_file:
            st.history.append(record)
            if self.logger is not None:
                self.logger.write(record)
            bar.set_postfix(mse=f"{metrics['mse_loss']:.3g}", l0=f"{metrics['l0']:.1f}",
                            ev=f"{metrics['explained_variance']:.3f}")
        if to_wandb and self.logger is not None:
            self.logger.to_wandb(record)

    # --------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: SAE, Adam, counters, torch RNG."""
        return {"sae": self.sae.state_dict(), "optimizer": self.optimizer.state_dict(),
                "trainer": self.state.to_dict(), "rng": torch.get_rng_state()}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict` (the SAE and optimiser must have the saved shapes)."""
        self.sae.load_state_dict(saved["sae"])
        self.optimizer.load_state_dict(saved["optimizer"])
        for name, value in saved["trainer"].items():
            setattr(self.state, name, value.cpu() if isinstance(value, torch.Tensor) else value)
        torch.set_rng_state(saved["rng"].cpu())


@torch.no_grad()
def resample_dead_latents(trainer: Trainer, x: torch.Tensor, x_hat: torch.Tensor) -> int:
    """Restart the dead latents on inputs the SAE reconstructs worst; returns how many.

    Recipe (Bricken et al. 2023, "Towards Monosemanticity", appendix "Neuron resampling"):
    draw one input per dead latent with probability ∝ its squared reconstruction loss
    ``||x - x̂||²``; the latent's decoder row becomes the unit direction of that input (centred
    by ``b_dec``), its encoder column that direction times 0.2 × the mean encoder norm of alive
    latents, its biases reset; Adam's moments for those entries are zeroed. Uses torch's global
    RNG (saved in checkpoints).
    """
    sae, dead = trainer.sae, trainer.dead_mask()
    ids = dead.nonzero().squeeze(1).to(sae.W_dec.device)
    if ids.numel() == 0:
        return 0
    loss = (x - x_hat).pow(2).sum(-1).double()
    picks = torch.multinomial(loss.pow(2) + 1e-30, ids.numel(), replacement=True)
    directions = x[picks] - sae.b_dec
    directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
    alive = ~dead.to(sae.W_enc.device)
    enc_norm = sae.W_enc[:, alive].norm(dim=0).mean().item() if alive.any() else 1.0
    sae.reinit_latents(ids, directions, 0.2 * enc_norm)
    _reset_adam_entries(trainer.optimizer, sae, ids)
    trainer.state.steps_since_fired[dead] = 0
    return ids.numel()


def _reset_adam_entries(optimizer: torch.optim.Optimizer, sae: SAE, ids: torch.Tensor) -> None:
    """Zero Adam's moments at latents ``ids`` of every per-latent parameter."""
    for name, param in sae.named_parameters():
        dim = 1 if name == "W_enc" else 0 if param.dim() and param.shape[0] == sae.cfg.d_sae else None
        state = optimizer.state.get(param)
        if dim is None or not state:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            state[key].index_fill_(dim, ids, 0.0)


def _batch_explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    resid = (x - x_hat).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum()
    return 1.0 - (resid / total).item()


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained SAE (folded, on raw activations), its folder, the
    training throughput of this run (tokens/s) and the trainer's final state (history, densities)."""

    sae: SAE
    output_path: Path
    tokens_per_second: float
    state: TrainerState


def prepare_output(path: Path, overwrite: bool, cache_path: Path) -> None:
    """Create the SAE folder; with ``overwrite`` replace only an SAE or an unfinished training run.

    Raises:
        ConfigError: the path is a file, is or contains the cache, holds an SAE or unfinished run
            (without ``overwrite``), or holds anything else (never deleted).
    """
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_path {str(path)!r} is a file; choose a folder path for the SAE.")
    out, cache = path.resolve(), cache_path.resolve()
    if out == cache or out in cache.parents or cache in out.parents:
        raise ConfigError(f"output_path {str(path)!r} overlaps the cache {str(cache_path)!r}; choose another folder.")
    if path.is_dir() and any(path.iterdir()):
        is_sae = (path / SAE_CFG_FILENAME).exists()
        unfinished = not is_sae and (path / TRAIN_CONFIG_FILENAME).exists()
        if not (is_sae or unfinished):
            raise ConfigError(
                f"output_path {str(path)!r} holds files that are not an SAE; nothing was changed "
                "(--overwrite only replaces SAE folders). Choose an empty or new folder."
            )
        if not overwrite:
            what = "an SAE" if is_sae else "an unfinished training run (no cfg.json: it was interrupted)"
            resume = " or --resume to continue it from its last checkpoint" if list_checkpoints(
                path / "checkpoints") else ""
            raise ConfigError(
                f"output_path {str(path)!r} already holds {what}. Nothing was changed. Pass --overwrite to "
                f"replace it{resume}, or choose another output_path."
            )
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


def sample_activations(cache: ActivationCache, hook: str, n_rows: int, seed: int, exclude=()) -> torch.Tensor:
    """Up to ``n_rows`` rows ``[n, d_in]`` float32 from random training chunks (for b_dec init)."""
    rng = np.random.default_rng(seed)
    rows, total = [], 0
    for c in rng.permutation(cache.train_chunks):
        block = cache.read_chunk(hook, int(c), verify=True).float()
        ids = cache.chunk_token_ids(int(c))
        block = block[torch.from_numpy(~np.isin(ids, np.asarray(list(exclude), dtype=np.int64)))]
        rows.append(block)
        total += block.shape[0]
        if total >= n_rows:
            break
    return torch.cat(rows)[:n_rows]


def _sae_metadata(cache: ActivationCache) -> dict[str, Any]:
    """What SAELens/SAEBench read from ``cfg.json`` metadata about the data the SAE saw."""
    a = cache.attrs
    return {"context_size": a["context_size"], "prepend_bos": a.get("prepend_bos", False),
            "dataset_path": a.get("dataset_path", "")}


def _budget_notes(cfg: TrainConfig, rows_per_epoch: int) -> list[str]:
    """What the user should know about how the token budget maps onto steps and epochs."""
    notes = []
    if cfg.architecture in ARCHITECTURE_FIELDS["topk_threshold_lr"]:
        covered = 1 - (1 - cfg.topk_threshold_lr) ** cfg.total_steps
        if covered < 0.95:
            notes.append(f"the inference threshold (an EMA at topk_threshold_lr {cfg.topk_threshold_lr}) covers only "
                         f"{covered:.0%} of its way in {cfg.total_steps} steps, so the saved SAE's L0 will exceed k; "
                         "train longer or raise topk_threshold_lr")
    steps_tokens = cfg.total_steps * cfg.train_batch_size_tokens
    if steps_tokens != cfg.training_tokens:
        notes.append(f"training_tokens {cfg.training_tokens:,} rounds up to {cfg.total_steps} whole batches "
                     f"of {cfg.train_batch_size_tokens:,} = {steps_tokens:,} tokens")
    if steps_tokens > rows_per_epoch:
        notes.append(f"the cache holds {rows_per_epoch:,} training tokens, so training makes "
                     f"{steps_tokens / rows_per_epoch:.1f} epochs over it (harvest more tokens to avoid repeats)")
    return notes


@torch.no_grad()
def init_b_dec(sae: SAE, sample: torch.Tensor, method: str) -> None:
    """``b_dec`` ← geometric median (Gao et al. 2024, A.1; SAELens's default), mean, or zeros of
    ``sample`` ``[n, d_in]`` (already scaled like the training batches)."""
    if method == "geometric_median":
        sae.b_dec.copy_(geometric_median(sample.to(sae.b_dec.device)))
    elif method == "mean":
        sae.b_dec.copy_(sample.mean(0))
    else:
        sae.b_dec.zero_()


def build_sae(cfg: TrainConfig, d_in: int, hook: str, model_name: str, metadata: dict[str, Any]) -> SAE:
    """The untrained SAE ``cfg`` describes (architecture fields copied into its SAEConfig)."""
    k = cfg.k if cfg.architecture in ARCHITECTURE_FIELDS["k"] else None
    if cfg.architecture == "topk":
        k = int(k)
    sae_cfg = SAEConfig(
        architecture=cfg.architecture, d_in=d_in, d_sae=cfg.d_sae, k=k, hook_name=hook,
        model_name=model_name, dtype=cfg.dtype, device=cfg.device,
        apply_b_dec_to_input=cfg.apply_b_dec_to_input, aux_k_coefficient=cfg.aux_loss_coefficient,
        topk_threshold_lr=cfg.topk_threshold_lr, matryoshka_widths=list(cfg.matryoshka_widths),
        jumprelu_init_threshold=cfg.jumprelu_init_threshold, jumprelu_bandwidth=cfg.jumprelu_bandwidth,
        jumprelu_sparsity_loss_mode=cfg.jumprelu_sparsity_loss_mode,
        jumprelu_tanh_scale=cfg.jumprelu_tanh_scale, pre_act_loss_coefficient=cfg.pre_act_loss_coefficient,
        use_ghost_grads=cfg.use_ghost_grads, metadata=metadata)
    return get_architecture(cfg.architecture)(sae_cfg)


def _wandb_args(cfg: TrainConfig, out: Path) -> dict[str, Any] | None:
    if not cfg.log_to_wandb:
        return None
    name = cfg.run_name or f"{cfg.architecture}-{cfg.d_sae}-LR-{cfg.lr}-Tokens-{cfg.training_tokens:3.3e}"
    return {"project": cfg.wandb_project, "entity": cfg.wandb_entity, "name": name,
            "config": cfg.to_dict(), "dir": str(out)}


def cache_identity(cache: ActivationCache, hook: str) -> dict[str, Any]:
    """What identifies the data a run trains on (checked when resuming): the cache's model and
    dataset fingerprints, token ids hash, and the per-chunk CRC-32s of ``hook``'s activations."""
    a = cache.attrs
    identity = {key: a.get(key) for key in ("weights_fingerprint", "dataset_fingerprint", "tokens_sha256")}
    crcs = [cache.recorded_checksum(hook, i) for i in range(cache.layout.n_chunks)]
    identity["activation_checksums"] = hashlib.sha256(np.asarray(crcs, dtype=np.int64).tobytes()).hexdigest()
    return identity


def _start_or_resume(cfg: TrainConfig, out: Path, cache: ActivationCache, hook: str) -> dict[str, Any] | None:
    """Prepare the output folder; with ``resume_from_checkpoint`` return the saved state instead.

    Raises:
        ConfigError: see :func:`prepare_output`; or the checkpoint is missing or was written
            with a config that differs in a field that shapes the run.
    """
    if cfg.resume_from_checkpoint is None:
        prepare_output(out, cfg.overwrite, Path(cfg.cache_path))
        return None
    folder = resolve_checkpoint(cfg.resume_from_checkpoint, cfg.checkpoint_dir)
    saved = load_checkpoint_state(folder)
    check_resumable(saved["config"], cfg.to_dict())
    check_same_cache(saved.get("cache", {}), cache_identity(cache, hook))
    if (out / SAE_CFG_FILENAME).exists():
        if not cfg.overwrite:
            raise ConfigError(
                f"output_path {str(out)!r} already holds a finished SAE; resuming would replace it. Nothing "
                "was changed. Pass --overwrite to replace it, or choose another output_path."
            )
        for name in (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME, "metrics.json"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    print(f"note: resuming from {folder} (step {saved['trainer']['step']} of {cfg.total_steps})")
    return saved


def train(cfg: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Stage 2 in the library: train one SAE on ``cfg.cache_path`` and save it to ``cfg.output_path``.

    Writes ``cfg.json``, ``sae_weights.safetensors``, ``sparsity.safetensors`` (SAELens layout),
    ``train_config.yaml`` and ``metrics.jsonl``; ``n_checkpoints`` checkpoints under
    ``cfg.checkpoint_dir``. With ``resume_from_checkpoint`` it continues a stopped run and ends with
    the same weights as an uninterrupted run of the same config.

    Raises:
        CacheError: the cache is missing, incomplete, or lacks ``cfg.hook_name``.
        ConfigError: ``cfg.d_in`` disagrees with the cache, the output folder is not empty, or the
            checkpoint to resume from is missing or from a different config.
        TrainingError: the loss became NaN/Inf.
    """
    cfg.validate()  # configs built in Python skip from_dict's checks
    torch.manual_seed(cfg.seed)
    cache = ActivationCache.open(cfg.cache_path)
    hook = cache.resolve_hook(cfg.hook_name)
    d_in = cache.d_in_of(hook)
    if cfg.d_in is not None and cfg.d_in != d_in:
        raise ConfigError(
            f"d_in {cfg.d_in} in the config does not match the cache ({d_in} at {hook!r}); "
            f"remove d_in or set it to {d_in}."
        )
    out = Path(cfg.output_path)
    saved = _start_or_resume(cfg, out, cache, hook)
    exclude = cache.special_token_ids if cfg.exclude_special_tokens else []
    scale = activation_scale(cache.statistics(hook)["mean_norm"], d_in, cfg.normalize_activations)
    sae = build_sae(cfg, d_in, hook, cache.attrs["model_name"], _sae_metadata(cache))
    if saved is None:
        init_b_dec(sae, sample_activations(cache, hook, 16_384, cfg.seed, exclude) * scale, cfg.b_dec_init_method)
    loader = ActivationLoader(cache, hook, batch_size=cfg.train_batch_size_tokens,
                              shuffle_buffer_tokens=cfg.shuffle_buffer_tokens, seed=cfg.seed,
                              num_workers=cfg.num_workers, prefetch_batches=cfg.prefetch_batches,
                              exclude_token_ids=exclude, device=cfg.device)
    for note in _budget_notes(cfg, loader.rows_per_epoch()):
        print(f"note: {note}")
    cfg.save_yaml(out / TRAIN_CONFIG_FILENAME)
    start = saved["trainer"]["step"] if saved else 0
    if saved is None:
        (out / METRICS_LOG_FILENAME).unlink(missing_ok=True)
    else:
        MetricsLogger.truncate_after(out / METRICS_LOG_FILENAME, start)
    sparsity_name = {"l0_coefficient": "l0_loss"}.get(sae.sparsity_coefficient_name or "", "l1_loss")
    logger = MetricsLogger(out / METRICS_LOG_FILENAME, sparsity_name, _wandb_args(cfg, out))
    try:
        identity = cache_identity(cache, hook)
        trainer = Trainer(sae, cfg, logger, on_checkpoint=lambda t: _checkpoint(t, scale, identity))
        if saved is not None:
            trainer.load_state_dict(saved)
        t0 = time.perf_counter()
        batches = loader.batches(cfg.total_steps - start, skip=start)
        state = trainer.fit((x * scale for x in batches), progress=progress)
        elapsed = time.perf_counter() - t0
    finally:
        logger.close()
    sae.fold_activation_scale(scale)
    sae.save(out, sparsity=_log_density(state, cfg.d_sae))
    return TrainResult(sae, out, (state.tokens_seen - start * cfg.train_batch_size_tokens) / elapsed
                       if elapsed else 0.0, state)


def _log_density(state: TrainerState, d_sae: int) -> torch.Tensor:
    density = state.feature_density if state.feature_density is not None else torch.zeros(d_sae)
    return torch.log10(density.clamp_min(1e-10))


def _checkpoint(trainer: Trainer, scale: float, cache: dict[str, Any]) -> None:
    cfg = trainer.cfg
    state = {**trainer.state_dict(), "config": cfg.to_dict(), "cache": cache}
    folder = save_checkpoint(checkpoint_folder(cfg.checkpoint_dir, trainer.state.step), trainer.sae, scale,
                             _log_density(trainer.state, cfg.d_sae), state)
    tqdm.write(f"checkpoint: {folder}")
