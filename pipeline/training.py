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
   :mod:`pipeline.tracking`). A NaN/Inf in the batch, the loss or a gradient stops the SAE before
   its optimiser step, and NaN/Inf parameters or Adam moments are never saved (checked before each
   checkpoint and the final save); the error names the step, each tensor holding NaN/Inf with its
   count, the last finite loss and the checkpoint kept (:meth:`Trainer.nonfinite_error`).
5. Optionally, dead latents are resampled every ``feature_sampling_window`` steps, and
   ``n_checkpoints`` checkpoints are written (:mod:`pipeline.checkpoint`) from which a run resumes
   exactly.

Many SAEs from one pass (:func:`train_group`): SAEs whose configs agree on every field in
``STREAM_FIELDS`` see the same batches, so the loader reads and decompresses each batch once and
:func:`fit_group` steps every SAE's own :class:`Trainer` on it. A single run (:func:`train`) and
a group member are set up and saved by the same :func:`start_run` / :func:`finish_run`, and a
group member ends with exactly the weights its single run would have. Members may resume from
checkpoints at different steps: the stream starts at the earliest, and each trainer steps only
on the batches from its own step on.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.cache import ActivationCache, local_folder
from pipeline.checkpoint import (checkpoint_folder, list_checkpoints, load_resumable, refused_writes,
                                 resolve_checkpoint, save_checkpoint)
from pipeline.config import ARCHITECTURE_FIELDS, TrainConfig
from pipeline.constants import (METRICS_LOG_FILENAME, SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME,
                                TRAIN_CONFIG_FILENAME)
from pipeline.errors import ConfigError, SaePipelineError, TrainingError
from pipeline.loader import ActivationLoader
from pipeline.sae import SAE, SAEConfig, TrainStepOutput, get_architecture
from pipeline.sae.io import atomic_write, log_feature_density
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
        self.optimizer = make_adam(sae, cfg)
        d_sae = sae.cfg.d_sae
        self.state = TrainerState(
            steps_since_fired=torch.zeros(d_sae, dtype=torch.int64),
            window_fire_counts=torch.zeros(d_sae, dtype=torch.float64),
        )
        n = cfg.n_checkpoints
        self.checkpoint_steps = {i * cfg.total_steps // n for i in range(1, n + 1)} if n else set()
        self.last_finite_loss: tuple[int, float] | None = None  # (step, loss), reported at a NaN/Inf
        # This trainer's own torch RNG stream (dead-latent resampling draws from it), swapped in
        # around each step so trainers sharing a process draw exactly as they would alone.
        self.rng_state = rng_snapshot(cfg.device)
        # Mixed precision (SAELens's ``autocast``): bf16 matmuls, fp32 master weights and Adam state.
        self.autocast = torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=cfg.autocast)
        self.start_clock()

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

        A NaN/Inf in the batch, the loss or a gradient stops it before the optimiser moves, so
        the SAE keeps the parameters of the last good step.

        Raises:
            TrainingError: ``x``, the loss or a gradient holds NaN/Inf (:meth:`nonfinite_error`).
        """
        cfg, st = self.cfg, self.state
        if not _all_finite([x]):
            raise self.nonfinite_error("the input batch holds NaN/Inf", x)
        mult = lr_multiplier(st.step, cfg.total_steps, cfg.lr_warm_up_steps, cfg.lr_decay_steps,
                             cfg.lr_scheduler_name)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * mult
        coefficient = self.sparsity_coefficient(st.step)
        with self.autocast:
            out = self.sae.training_loss(x, sparsity_coefficient=coefficient, dead_mask=self.dead_mask())
        if not torch.isfinite(out.loss):
            raise self.nonfinite_error(f"loss became {out.loss.item()}", x, out)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.sae.before_optimizer_step()
        if not _all_finite([p.grad for p in self.sae.parameters() if p.grad is not None]):
            raise self.nonfinite_error("a gradient holds NaN/Inf", x, out)  # checked before clipping spreads it
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.sae.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.sae.after_optimizer_step()
        counts = self.sae.firing_counts(out).to(torch.float64)
        self._track_firing(counts, x.shape[0])
        self.last_finite_loss = (st.step, out.loss.item())
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

    def start_clock(self) -> None:
        """Start timing this run's throughput (``tokens_per_second`` in the log)."""
        self._t0, self._tokens_this_run = time.perf_counter(), 0

    def advance(self, x: torch.Tensor) -> dict[str, Any] | None:
        """:meth:`step` on ``x`` ``[batch, d_in]`` plus its bookkeeping: the log record every
        ``log_every`` steps (returned; None on other steps), W&B, and the checkpoint at checkpoint
        steps.

        Before the checkpoint and after the last step it checks that the parameters and Adam's
        moments are finite, so a NaN/Inf state is never saved (the checkpoints before it stay the
        last good ones).

        Raises:
            TrainingError: a NaN/Inf in the batch, loss, gradients, parameters or Adam state.
        """
        metrics = self.step(x)
        self._tokens_this_run += x.shape[0]
        record = self._emit(metrics, time.perf_counter() - self._t0)
        saving = self.state.step in self.checkpoint_steps and self.on_checkpoint is not None
        if (saving or self.done) and not _all_finite(self._saved_tensors()):
            raise self.nonfinite_error("the parameters became NaN/Inf (not saved)", with_optimizer=True)
        if saving:
            self.on_checkpoint(self)
        return record

    def _saved_tensors(self) -> list[torch.Tensor]:
        """What a checkpoint or the final save stores that could hold NaN/Inf: parameters, Adam's moments."""
        moments = [value for state in self.optimizer.state.values() for key, value in state.items()
                   if key.startswith("exp_avg")]
        return [*self.sae.parameters(), *moments]

    def nonfinite_tensors(self, x: torch.Tensor | None = None, out: TrainStepOutput | None = None, *,
                          with_optimizer: bool = False) -> list[str]:
        """One line per tensor holding NaN/Inf, with counts: the batch ``x`` ``[batch, d_in]``, the
        loss parts of ``out``, each parameter and its gradient, and (``with_optimizer``) Adam's moments."""
        tensors = [("the input batch", x)] if x is not None else []
        if out is not None:
            tensors += [(name, getattr(out, name)) for name in ("mse_loss", "sparsity_loss", "aux_loss")]
        names = {}
        for name, param in self.sae.named_parameters():
            names[param] = name
            tensors += [(name, param.detach())] + ([(f"{name}.grad", param.grad)] if param.grad is not None else [])
        if with_optimizer:
            tensors += [(f"Adam {key} of {names[param]}", value) for param, state in self.optimizer.state.items()
                        for key, value in state.items() if key.startswith("exp_avg")]
        return [line for name, tensor in tensors if (line := _nonfinite(name, tensor))]

    def nonfinite_error(self, what: str, x: torch.Tensor | None = None, out: TrainStepOutput | None = None, *,
                        with_optimizer: bool = False) -> TrainingError:
        """The error that stops this SAE at a NaN/Inf: ``what`` happened at the current step; then
        every tensor holding NaN/Inf (:meth:`nonfinite_tensors`), the last finite loss and the
        checkpoint left on disk."""
        found = self.nonfinite_tensors(x, out, with_optimizer=with_optimizer)
        seen = "; ".join(found) or "every input, parameter and gradient value is finite (an overflow inside the loss)"
        if x is not None and torch.isfinite(x).any():
            seen += f"; max finite |x| {x[torch.isfinite(x)].abs().max().item():.4g}"
        last = ("no finite loss yet" if self.last_finite_loss is None else
                f"last finite loss {self.last_finite_loss[1]:.6g} at step {self.last_finite_loss[0]}")
        kept = list_checkpoints(self.cfg.checkpoint_dir) if self.cfg.n_checkpoints else []
        kept_note = f"Its last checkpoint, {kept[-1]}, is kept." if kept else "No checkpoint was written before it."
        return TrainingError(f"{what} at step {self.state.step}: {seen}; {last}. {kept_note} Lower lr, or check "
                             "the cache with `sae-pipeline cache verify`.")

    @property
    def done(self) -> bool:
        return self.state.step >= self.cfg.total_steps

    def close_window(self) -> None:
        """End of training: a partly filled density window still gives the final densities."""
        if self.state.window_tokens:
            self._close_window()

    def fit(self, batches: Iterable[torch.Tensor], *, progress: bool = True) -> TrainerState:
        """Run until ``cfg.total_steps`` (fewer if ``batches`` runs out), from ``state.step``.

        Raises:
            TrainingError: the loss became NaN/Inf (out-of-memory errors propagate as raised).
        """
        failures = fit_group([self], batches, progress=progress)
        if failures:
            raise failures[0]
        return self.state

    def _emit(self, metrics: dict[str, float], elapsed: float) -> dict[str, Any] | None:
        """Log to JSON lines every ``log_every`` steps and to W&B every ``wandb_log_frequency``;
        returns the JSON-lines record, or None on steps that write none."""
        st, cfg = self.state, self.cfg
        last = st.step == cfg.total_steps
        to_file = st.step % cfg.log_every == 0 or last
        to_wandb = cfg.log_to_wandb and (st.step % cfg.wandb_log_frequency == 0 or last)
        if not (to_file or to_wandb):
            return None
        record = self._record(metrics, elapsed)
        if to_file:
            st.history.append(record)
            if self.logger is not None:
                self.logger.write(record)
        if to_wandb and self.logger is not None:
            self.logger.to_wandb(record)
        return record if to_file else None

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
        self.rng_state = rng_snapshot(self.cfg.device)


# Errors that end one SAE's training but not its group's: NaN/Inf loss, memory exhausted (CPU
# allocators raise RuntimeError "can't allocate memory", CUDA raises torch.OutOfMemoryError).
_MEMORY_ERRORS = (torch.OutOfMemoryError, MemoryError)


# Devices whose fused Adam kernel torch 2.13 has: one pass over each parameter instead of foreach's
# several (on one CPU thread 8 ms instead of 55 ms for a d_in 576, d_sae 4608 SAE's 5.3M parameters).
FUSED_ADAM_DEVICES = ("cpu", "cuda")


def make_adam(sae: SAE, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam over ``sae``'s parameters with ``cfg.lr`` and betas, fused where the device has the
    kernel (same update rule as SAELens's ``torch.optim.Adam``; results agree to float rounding)."""
    fused = torch.device(cfg.device).type in FUSED_ADAM_DEVICES and all(
        p.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) for p in sae.parameters())
    return torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            fused=fused or None)


def is_point_failure(err: BaseException) -> bool:
    """True for an error that fails one SAE of a group (NaN/Inf loss, out of memory), not the group."""
    if isinstance(err, (TrainingError, *_MEMORY_ERRORS)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def rng_snapshot(device: str | torch.device) -> dict[str, torch.Tensor]:
    """The global torch RNG state: CPU, plus the CUDA device's when ``device`` is a GPU."""
    dev = torch.device(device)
    state = {"cpu": torch.get_rng_state()}
    if dev.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(dev)
    return state


def _restore_rng(state: dict[str, torch.Tensor], device: str | torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], torch.device(device))


@contextmanager
def own_rng(trainer: Trainer) -> Iterator[None]:
    """Run the block on ``trainer.rng_state``; store where it ended and restore the outer state."""
    outer = rng_snapshot(trainer.cfg.device)
    _restore_rng(trainer.rng_state, trainer.cfg.device)
    try:
        yield
    finally:
        trainer.rng_state = rng_snapshot(trainer.cfg.device)
        _restore_rng(outer, trainer.cfg.device)


def fit_group(trainers: list[Trainer], batches: Iterable[torch.Tensor], *, progress: bool = True,
              ) -> dict[int, BaseException]:
    """Feed each batch of ``batches`` to every trainer in turn, each until its own ``total_steps``.

    One stream serves the group: ``batches`` are the stream's steps ``s, s+1, ...`` with ``s`` the
    smallest ``state.step`` among the trainers, and batch ``t`` goes to every trainer whose own
    ``state.step`` is ``t`` and still below its ``total_steps`` (a trainer resumed at a later step
    skips the batches it saw before it stopped; one with fewer steps sees a prefix of the others'
    batches). Each trainer steps on its own RNG stream (:func:`own_rng`), so it ends exactly as it
    would trained alone on the same batches. Trainers are stepped one after another, each with its
    own matrix products: stacking same-shaped SAEs into one batched product does not pay on CPU
    (8 TopK encoders of d_in 576, d_sae 2304 or 4608, batch 4096, one thread: the fastest of 9
    calls of one ``x @ W_cat`` or ``torch.bmm`` within 3% of 8 separate products; the README's
    Sweeps section, ``sweep_stacking`` rows of :mod:`pipeline.bench.sweep_speed`), and a product
    shared across SAEs could not keep a member bit-identical to its single run, since each
    subtracts its own ``b_dec`` first.

    Args:
        trainers: trainers whose configs share ``train_batch_size_tokens`` (one progress bar
            counts the stream's tokens).
        batches: ``[batch, d_in]`` float32 tensors, already scaled; each is read, never modified.

    Returns:
        ``{index in trainers: error}`` for trainers that failed (NaN/Inf loss, out of memory:
        :func:`is_point_failure`); they drop out and the others continue. Any other error propagates.
    """
    cfg = trainers[0].cfg
    desc = f"train {cfg.architecture}" if len(trainers) == 1 else f"train {len(trainers)} SAEs"
    bar = tqdm(total=max(t.cfg.total_steps for t in trainers) * cfg.train_batch_size_tokens,
               initial=min(t.state.tokens_seen for t in trainers), unit="tok", unit_scale=True, desc=desc,
               disable=not progress, dynamic_ncols=True)
    failures: dict[int, BaseException] = {}
    for t in trainers:
        t.start_clock()
    with bar, closing_when_done(batches):
        for step, x in enumerate(batches, min(t.state.step for t in trainers)):
            if all(i in failures or t.done for i, t in enumerate(trainers)):
                break
            # only trainers at this step: one resumed ahead of the stream skips the batches it has seen
            active = [i for i, t in enumerate(trainers) if i not in failures and not t.done and t.state.step == step]
            for i in active:
                record = _advance_or_fail(trainers[i], x, i, failures, keep_traceback=len(trainers) == 1)
                if record is not None and len(trainers) == 1:
                    bar.set_postfix(mse=f"{record['mse_loss']:.3g}", l0=f"{record['l0']:.1f}",
                                    ev=f"{record['explained_variance']:.3f}")
            bar.update(x.shape[0])
            if len(trainers) > 1:
                bar.set_postfix(training=len(active) - sum(i in failures for i in active), failed=len(failures))
    for i, t in enumerate(trainers):
        if i not in failures:
            t.close_window()
    return failures


@contextmanager
def closing_when_done(batches: Iterable[torch.Tensor]) -> Iterator[None]:
    """Close a generator of batches on leaving the block, even part-way (every trainer done or
    failed early): the loader's threads then stop here, not in a garbage collection that may run
    on one of zarr's own threads and wait for itself."""
    try:
        yield
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def _advance_or_fail(trainer: Trainer, x: torch.Tensor, i: int, failures: dict[int, BaseException], *,
                     keep_traceback: bool):
    """``trainer.advance(x)`` on its own RNG; a point failure is recorded in ``failures``, not raised."""
    try:
        with own_rng(trainer):
            return trainer.advance(x)
    except Exception as err:
        if not is_point_failure(err):
            raise
        failures[i] = err if keep_traceback else err.with_traceback(None)  # the frames hold the step's tensors
        if not isinstance(err, TrainingError):
            trainer.optimizer.state.clear()  # out of memory: hand its Adam moments to the rest of the group
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return None


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


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every value of ``tensors`` is finite. One sum per tensor (a NaN or Inf makes it NaN
    or Inf) costs ~0.5% of a TopK step at d_sae 4608 where ``isfinite().all()`` costs ~6%; a sum
    that overflowed from huge finite values is rechecked value by value."""
    with torch.no_grad():
        if bool(torch.isfinite(torch.stack([t.sum(dtype=torch.float32) for t in tensors])).all()):
            return True
        return all(bool(torch.isfinite(t).all()) for t in tensors)


def _nonfinite(name: str, tensor: torch.Tensor) -> str | None:
    """``"<name>: 3 of 9,216 values NaN/Inf (2 NaN, 1 Inf)"``, or None when every value is finite."""
    n_bad = int((~torch.isfinite(tensor)).sum())
    if not n_bad:
        return None
    n_nan = int(torch.isnan(tensor).sum())
    return f"{name}: {n_bad:,} of {tensor.numel():,} values NaN/Inf ({n_nan:,} NaN, {n_bad - n_nan:,} Inf)"


def _batch_explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    resid = torch.nn.functional.mse_loss(x_hat.to(x.dtype), x, reduction="sum")
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


def prepare_output(path: Path, overwrite: bool, cache_path: str | Path) -> None:
    """Create the SAE folder; with ``overwrite`` replace only an SAE or an unfinished training run.

    ``cache_path`` is a local folder or a URL (:func:`pipeline.cache.local_folder`: only a local
    cache, ``file://`` URLs included, can overlap the SAE folder).

    Raises:
        ConfigError: the path is a file, is or contains the cache, holds an SAE or unfinished run
            (without ``overwrite``), or holds anything else (never deleted).
    """
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_path {str(path)!r} is a file; choose a folder path for the SAE.")
    out, folder = path.resolve(), local_folder(cache_path)
    cache = folder.resolve() if folder is not None else None
    if cache is not None and (out == cache or out in cache.parents or cache in out.parents):
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
        block = cache.read_kept_rows(hook, int(c), exclude, verify=True).float()
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
    """``b_dec`` ← :func:`b_dec_init_value` of ``sample`` ``[n, d_in]`` (already scaled like the
    training batches)."""
    sae.b_dec.copy_(b_dec_init_value(sample.to(sae.b_dec.device), method))


def b_dec_init_value(sample: torch.Tensor, method: str) -> torch.Tensor:
    """``[d_in]``: the geometric median (Gao et al. 2024, A.1; SAELens's default), mean, or zeros of
    ``sample: [n, d_in]``, by ``method`` (``b_dec_init_method``)."""
    if method == "geometric_median":
        return geometric_median(sample)
    return sample.mean(0) if method == "mean" else sample.new_zeros(sample.shape[1])


def build_sae(cfg: TrainConfig, d_in: int, hook: str, model_name: str, metadata: dict[str, Any]) -> SAE:
    """The untrained SAE ``cfg`` describes (architecture fields copied into its SAEConfig)."""
    k = cfg.k if cfg.architecture in ARCHITECTURE_FIELDS["k"] else None
    if cfg.architecture == "topk":
        k = int(k)
    sae_cfg = SAEConfig(
        architecture=cfg.architecture, d_in=d_in, d_sae=cfg.d_sae, k=k, hook_name=hook,
        model_name=model_name, dtype=cfg.dtype, device=cfg.device,
        apply_b_dec_to_input=cfg.apply_b_dec_to_input, aux_k_coefficient=cfg.aux_loss_coefficient,
        rescale_acts_by_decoder_norm=(cfg.rescale_acts_by_decoder_norm
                                      and cfg.architecture in ARCHITECTURE_FIELDS["rescale_acts_by_decoder_norm"]),
        topk_threshold_lr=cfg.topk_threshold_lr, matryoshka_widths=list(cfg.matryoshka_widths),
        jumprelu_init_threshold=cfg.jumprelu_init_threshold, jumprelu_bandwidth=cfg.jumprelu_bandwidth,
        jumprelu_sparsity_loss_mode=cfg.jumprelu_sparsity_loss_mode,
        jumprelu_tanh_scale=cfg.jumprelu_tanh_scale, jumprelu_unit_norm_decoder=cfg.jumprelu_unit_norm_decoder,
        pre_act_loss_coefficient=cfg.pre_act_loss_coefficient,
        use_ghost_grads=cfg.use_ghost_grads, metadata=metadata)
    return get_architecture(cfg.architecture)(sae_cfg)


def _wandb_args(cfg: TrainConfig, out: Path) -> dict[str, Any] | None:
    if not cfg.log_to_wandb:
        return None
    name = cfg.run_name or f"{cfg.architecture}-{cfg.d_sae}-LR-{cfg.lr}-Tokens-{cfg.training_tokens:3.3e}"
    # create_new: the SAEs of a group each log to their own run, side by side in one process
    return {"project": cfg.wandb_project, "entity": cfg.wandb_entity, "name": name,
            "config": cfg.to_dict(), "dir": str(out), "reinit": "create_new"}


def cache_identity(cache: ActivationCache, hook: str) -> dict[str, Any]:
    """What identifies the data a run trains on (checked when resuming): the cache's model and
    dataset fingerprints, token ids hash, and the per-chunk CRC-32s of ``hook``'s activations."""
    a = cache.attrs
    identity = {key: a.get(key) for key in ("weights_fingerprint", "dataset_fingerprint", "tokens_sha256")}
    crcs = [cache.recorded_checksum(hook, i) for i in range(cache.layout.n_chunks)]
    identity["activation_checksums"] = hashlib.sha256(np.asarray(crcs, dtype=np.int64).tobytes()).hexdigest()
    return identity


def _start_or_resume(cfg: TrainConfig, out: Path, data: TrainingData) -> dict[str, Any] | None:
    """Prepare the output folder; with ``resume_from_checkpoint`` return the saved state instead.

    Raises:
        ConfigError: see :func:`prepare_output`; or the checkpoint is missing or was written
            with a config that differs in a field that shapes the run.
    """
    if cfg.resume_from_checkpoint is None:
        prepare_output(out, cfg.overwrite, cfg.cache_path)
        return None
    folder = resolve_checkpoint(cfg.resume_from_checkpoint, cfg.checkpoint_dir)
    saved = load_resumable(folder, cfg.to_dict(), data.identity)
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


# The TrainConfig fields that fix the batch stream: SAEs agreeing on all of them are fed the same
# batches, so they can share one pass of the loader. training_tokens is not among them: the stream
# is deterministic, so a shorter run's batches are a prefix of a longer one's. num_workers and
# prefetch_batches change only speed (a group uses its first SAE's).
STREAM_FIELDS = ("cache_path", "hook_name", "train_batch_size_tokens", "seed", "shuffle_buffer_tokens",
                 "normalize_activations", "exclude_special_tokens", "device")


def stream_key(cfg: TrainConfig) -> tuple:
    """``cfg``'s values of ``STREAM_FIELDS``: configs with equal keys see equal batches."""
    return tuple(getattr(cfg, name) for name in STREAM_FIELDS)


class TrainingData:
    """The batch stream of ``cfg`` (its ``STREAM_FIELDS``) and what every SAE trained on it shares:
    the cache, the hook, ``d_in``, the special-token ids left out, the normalisation scale ``s``, the
    cache's identity (for checkpoints) and the ``b_dec`` initialisation sample.

    Raises:
        CacheError: the cache is missing, incomplete, or lacks ``cfg.hook_name``.
        TrainingError: the cache's mean norm is 0 and activations are to be normalised.
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self._b_dec_inits: dict[str, torch.Tensor] = {}
        self.cache = ActivationCache.open(cfg.cache_path)
        self.hook = self.cache.resolve_hook(cfg.hook_name)
        self.d_in = self.cache.d_in_of(self.hook)
        self.exclude = self.cache.special_token_ids if cfg.exclude_special_tokens else []
        self.scale = activation_scale(self.cache.statistics(self.hook)["mean_norm"], self.d_in,
                                      cfg.normalize_activations)

    def check_d_in(self, cfg: TrainConfig) -> None:
        """Raise ConfigError when ``cfg.d_in`` is set and differs from the cache's."""
        if cfg.d_in is not None and cfg.d_in != self.d_in:
            raise ConfigError(
                f"d_in {cfg.d_in} in the config does not match the cache ({self.d_in} at {self.hook!r}); "
                f"remove d_in or set it to {self.d_in}."
            )

    @cached_property
    def identity(self) -> dict[str, Any]:
        return cache_identity(self.cache, self.hook)

    @cached_property
    def rows_per_epoch(self) -> int:
        return self.loader().rows_per_epoch()

    @cached_property
    def b_dec_sample(self) -> torch.Tensor:
        """``[16384, d_in]`` float32 scaled rows drawn with the stream's seed (the same for the group)."""
        return sample_activations(self.cache, self.hook, 16_384, self.cfg.seed, self.exclude) * self.scale

    def b_dec_init(self, method: str) -> torch.Tensor:
        """:func:`b_dec_init_value` of :attr:`b_dec_sample` on the stream's device, computed once per
        method for the whole group (a geometric median takes about a second on one CPU thread)."""
        if method not in self._b_dec_inits:
            self._b_dec_inits[method] = b_dec_init_value(self.b_dec_sample.to(self.cfg.device), method)
        return self._b_dec_inits[method]

    def loader(self) -> ActivationLoader:
        cfg = self.cfg
        return ActivationLoader(self.cache, self.hook, batch_size=cfg.train_batch_size_tokens,
                                shuffle_buffer_tokens=cfg.shuffle_buffer_tokens, seed=cfg.seed,
                                num_workers=cfg.num_workers, prefetch_batches=cfg.prefetch_batches,
                                exclude_token_ids=self.exclude, device=cfg.device)

    def batches(self, n_batches: int, skip: int = 0) -> Iterator[torch.Tensor]:
        """Batches ``skip`` to ``skip + n_batches`` of the stream, ``[batch, d_in]`` float32, times ``s``."""
        return (x * self.scale for x in self.loader().batches(n_batches, skip=skip))


@dataclass
class SAERun:
    """One SAE being trained, from :func:`start_run` to :func:`finish_run`: its config, folder,
    trainer and open log, the step it starts from, the activation scale to fold into the saved
    weights, and notes on its token budget for the user."""

    cfg: TrainConfig
    output_path: Path
    trainer: Trainer
    logger: MetricsLogger
    start_step: int
    scale: float
    notes: list[str]


def start_run(cfg: TrainConfig, data: TrainingData) -> SAERun:
    """Everything before one SAE's first step: its output folder (or the checkpoint to resume), the
    SAE initialised from ``cfg.seed`` with ``b_dec`` from ``data``'s sample, ``train_config.yaml``,
    the metrics log and the trainer. Close ``run.logger`` when training ends, then :func:`finish_run`.

    Raises:
        ConfigError: ``cfg.d_in`` disagrees with the cache, the output folder is refused (see
            :func:`prepare_output`), or the checkpoint is missing or from another config or cache.
    """
    data.check_d_in(cfg)
    out = Path(cfg.output_path)
    # an unwritable output or checkpoint folder is found here, before any step, as one clear error
    with refused_writes("the output folder", out, cfg.checkpoint_dir):
        saved = _start_or_resume(cfg, out, data)
        atomic_write(out / TRAIN_CONFIG_FILENAME, cfg.save_yaml)
        if cfg.n_checkpoints:
            cfg.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)  # the init depends on the seed alone, whether trained alone or in a group
    sae = build_sae(cfg, data.d_in, data.hook, data.cache.attrs["model_name"], _sae_metadata(data.cache))
    if saved is None:
        with torch.no_grad():
            sae.b_dec.copy_(data.b_dec_init(cfg.b_dec_init_method))
    start = saved["trainer"]["step"] if saved else 0
    if saved is None:
        (out / METRICS_LOG_FILENAME).unlink(missing_ok=True)
    else:
        MetricsLogger.truncate_after(out / METRICS_LOG_FILENAME, start)
    sparsity_name = {"l0_coefficient": "l0_loss"}.get(sae.sparsity_coefficient_name or "", "l1_loss")
    logger = MetricsLogger(out / METRICS_LOG_FILENAME, sparsity_name, _wandb_args(cfg, out))
    try:
        trainer = Trainer(sae, cfg, logger, on_checkpoint=lambda t: _checkpoint(t, data.scale, data.identity))
        if saved is not None:
            trainer.load_state_dict(saved)
    except BaseException:
        logger.close()
        raise
    return SAERun(cfg, out, trainer, logger, start, data.scale, _budget_notes(cfg, data.rows_per_epoch))


def finish_run(run: SAERun, elapsed: float) -> TrainResult:
    """Fold the activation scale into the trained SAE and save it in SAELens layout with its log10
    feature densities (``cfg.json`` last, so a folder without it never looks finished);
    ``elapsed`` (seconds) of training gives ``tokens_per_second``.

    Raises:
        SAEWriteError: the OS refused a write (disk full); the folder has no ``cfg.json`` and the
            checkpoints are kept to continue from.
    """
    cfg, state, sae = run.cfg, run.trainer.state, run.trainer.sae
    sae.fold_activation_scale(run.scale)
    with refused_writes("the trained SAE", run.output_path, cfg.checkpoint_dir):
        sae.save(run.output_path, sparsity=_log_density(state, cfg.d_sae))
    tokens = state.tokens_seen - run.start_step * cfg.train_batch_size_tokens
    return TrainResult(sae, run.output_path, tokens / elapsed if elapsed else 0.0, state)


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
        SAEWriteError: the OS refused to write a checkpoint or the SAE (disk full); the checkpoints
            written before stay complete, to continue from with ``resume_from_checkpoint``.
    """
    cfg.validate()  # configs built in Python skip from_dict's checks
    data = TrainingData(cfg)
    run = start_run(cfg, data)
    for note in run.notes:
        print(f"note: {note}")
    try:
        t0 = time.perf_counter()
        run.trainer.fit(data.batches(cfg.total_steps - run.start_step, skip=run.start_step), progress=progress)
        elapsed = time.perf_counter() - t0
    finally:
        run.logger.close()
    return finish_run(run, elapsed)


def train_group(cfgs: list[TrainConfig], *, progress: bool = True) -> list[TrainResult | BaseException]:
    """Train SAEs that share one batch stream from a single pass of the loader (:func:`fit_group`).

    Each SAE is set up and saved as :func:`train` does it (same folder contents) and ends with the
    weights its single run would have, also when its config carries ``resume_from_checkpoint``: the
    stream starts at the smallest step the members start from, and a member resumed at a later step
    joins at its own step (:func:`fit_group`). The loader runs to the longest ``training_tokens``
    with the first config's ``num_workers`` and ``prefetch_batches``.

    Returns:
        Per config, in order: its :class:`TrainResult`, or the error that failed it alone (NaN/Inf
        loss, out of memory, a refused output folder). A failed SAE's folder has no ``cfg.json``.

    Raises:
        ConfigError: the configs differ in a field of ``STREAM_FIELDS`` or share an output_path.
        CacheError: the cache is missing, incomplete, or lacks the hook.
        SAEWriteError: the OS refused to write a checkpoint or a trained SAE (disk full); it stops
            the whole group, since every member writes to the same disk.
    """
    _check_one_stream(cfgs)
    data = TrainingData(cfgs[0])
    outcomes: list[TrainResult | BaseException | None] = [None] * len(cfgs)
    runs: dict[int, SAERun] = {}
    for i, cfg in enumerate(cfgs):
        try:
            runs[i] = start_run(cfg, data)
        except Exception as err:
            if not (isinstance(err, SaePipelineError) or is_point_failure(err)):
                raise
            outcomes[i] = err
    _print_group_notes(list(runs.values()))
    order = list(runs)
    elapsed, failures = 0.0, {}
    try:
        if order:
            t0 = time.perf_counter()
            start = min(runs[i].start_step for i in order)  # resumed members may stand at different steps
            n_batches = max(cfgs[i].total_steps for i in order) - start
            failures = fit_group([runs[i].trainer for i in order], data.batches(n_batches, skip=start),
                                 progress=progress)
            elapsed = time.perf_counter() - t0
    finally:
        for run in runs.values():
            run.logger.close()
    for j, i in enumerate(order):
        outcomes[i] = failures[j] if j in failures else finish_run(runs[i], elapsed)
    return outcomes


def _check_one_stream(cfgs: list[TrainConfig]) -> None:
    """Raise ConfigError unless ``cfgs`` can share one stream (see :func:`train_group`)."""
    if not cfgs:
        raise ConfigError("train_group got no configs; pass at least one TrainConfig.")
    for cfg in cfgs:
        cfg.validate()
        diffs = [name for name in STREAM_FIELDS if getattr(cfg, name) != getattr(cfgs[0], name)]
        if diffs:
            raise ConfigError(
                f"{cfg.output_path!r} and {cfgs[0].output_path!r} differ in {', '.join(diffs)}, which fix the "
                "batch stream; train them in separate groups."
            )
    paths = [str(Path(cfg.output_path).resolve()) for cfg in cfgs]
    if len(set(paths)) != len(paths):
        raise ConfigError("two configs of the group share an output_path; give each SAE its own folder.")


def _print_group_notes(runs: list[SAERun]) -> None:
    """Each distinct budget note once, naming the SAE folders it applies to."""
    folders: dict[str, list[str]] = {}
    for run in runs:
        for note in run.notes:
            folders.setdefault(note, []).append(run.output_path.name)
    for note, names in folders.items():
        print(f"note ({', '.join(names)}): {note}")


def _log_density(state: TrainerState, d_sae: int) -> torch.Tensor:
    """SAELens's ``sparsity`` of the last feature-sampling window (all -10 before the first)."""
    density = state.feature_density if state.feature_density is not None else torch.zeros(d_sae)
    return log_feature_density(density)


def _checkpoint(trainer: Trainer, scale: float, cache: dict[str, Any]) -> None:
    cfg = trainer.cfg
    state = {**trainer.state_dict(), "config": cfg.to_dict(), "cache": cache}
    folder = save_checkpoint(checkpoint_folder(cfg.checkpoint_dir, trainer.state.step), trainer.sae, scale,
                             _log_density(trainer.state, cfg.d_sae), state)
    tqdm.write(f"checkpoint: {folder}")
