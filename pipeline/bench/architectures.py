"""Every SAE architecture trained by us and by SAELens 6.54.12 on the same batches, evaluated alike.

    python -m pipeline.bench.architectures [--cache data/harvests/anchor_wikitext]
        [--architectures standard,gated,topk,batchtopk,jumprelu,matryoshka]
        [--training-tokens 1000000] [--seed 42] [--out data/bench/architectures.json]
    python -m pipeline.bench.architectures --calibrate [--calibrate-tokens 200000]

The anchor setup of ../shared/ANCHORS.md: SmolLM2-135M ``blocks.8.hook_resid_post``, 200K WikiText-2
tokens, d_sae 4608, 1M training tokens, batch 4096, lr 4e-4, seed 42, aiming at L0 ≈ 32 for
every architecture: k = 32 for topk/batchtopk/matryoshka (Matryoshka widths 128, 512, 2048,
4608); λ from ``SPARSITY_COEFFICIENTS`` for standard/gated/jumprelu, plus the two settings those
need to get there in 245 steps (standard lr 4e-3, jumprelu initial threshold 1.5; see
``ARCHITECTURE_SETTINGS``). ``--calibrate`` searches λ with short runs of our trainer. For each
architecture:

1. **ours**: ``pipeline.training.train(TrainConfig(...))``.
2. **SAELens**: its training SAE of the same architecture (``standard``, ``gated``, ``topk``,
   ``batchtopk``, ``jumprelu``, ``matryoshka_batchtopk``) driven by its own
   ``sae_lens.training.sae_trainer.SAETrainer``, whose data provider is a
   ``pipeline.loader.ActivationLoader`` built with exactly the arguments ``train`` uses (same
   seed, so the same raw batches in the same order; the script fingerprints the batches each
   trainer drew and stops if the streams differ). Saved with SAELens's ``save_inference_model`` (normalisation folded).
3. Both folders are loaded with ``pipeline.sae.SAE.load`` and evaluated by
   ``pipeline.evaluate.evaluate`` (held-out explained variance, L0 and dead fraction on the cache's
   holdout chunks, CE loss recovered on its first ``--n-ce-sequences`` holdout sequences), so the
   metrics and the SAELens → sae-pipeline format path are the same for both tools.

Prints architecture, tool, L0, EV, CE loss recovered, dead fraction and training tokens/s (the
training loop only: both tools fold the scale and save afterwards) and writes them as JSON.
On a quiet 2-core machine a full run takes roughly 1–1.5 hours (dense architectures train at
2–4K tokens/s in both tools; each evaluation with CE loss takes about a minute).

How SAELens is set up to match our run
--------------------------------------
* Normalisation: both use ``expected_average_only_in`` (inputs times ``s = sqrt(d_in) / E||x||``).
  SAELens's trainer estimates ``E||x||`` by pulling ``n_batches_for_norm_estimate`` (default
  1,000) batches from the data provider before training, which would consume 20 epochs of this
  cache and shift its batch stream away from ours; ``fit`` skips the estimate when the scaler
  already has a factor, so we give it ours (from the cache's recorded mean norm over its
  non-special tokens). The JSON also reports the factor SAELens's ``ActivationScaler`` estimates over one
  epoch of a separate loader, for comparison.
* Same lr, Adam betas, constant schedule without warm-up/decay, batch size, step count, seed,
  ``dead_feature_window`` (250) and ``feature_sampling_window`` (100); ``b_dec`` initialised to
  the geometric median of the same 16,384 scaled training rows (SAELens 6 leaves it at zero, ours
  uses the geometric median by default); same k, ``topk_threshold_lr``, Matryoshka widths,
  JumpReLU threshold/bandwidth/mode and sparsity coefficient; AuxK coefficient 1/32 (SAELens's
  default is 1.0); decoder rows start at our init norm: 1 for the TopK family and step-mode
  JumpReLU (SAELens ``decoder_init_norm=1.0``), 0.1 for standard and gated (both tools' default).
* Loss definitions (checked by reading both codes): MSE summed over d_in and averaged over the
  batch in both. standard: ``λ · mean_b Σ_i f_i ||W_dec,i||`` in both (SAELens ``lp_norm=1``).
  gated: same L1 on ``ReLU(π_gate)`` weighted by decoder norms plus the auxiliary gate
  reconstruction, the decoder live in both terms (same values and gradients; a unit test checks
  it against SAELens's ``GatedTrainingSAE``). jumprelu: ``λ · mean_b Σ_i H(h_i - θ_i)`` with the
  rectangle-kernel straight-through gradient to θ only (``step`` mode; SAELens
  ``jumprelu_ste_to_input=False``) in both. So the same λ means the same objective.

Differences that remain (SAELens's trainer or model code, not settings)
-----------------------------------------------------------------------
* Both clip the global gradient norm to 1.0 every step (our `max_grad_norm` default); ours clips
  after projecting the decoder-row gradients (unit-norm architectures), SAELens has no projection.
* TopK family: both keep the decoder free and rank latents by ``h · ||W_dec,i||``
  (``rescale_acts_by_decoder_norm``, both tools' default; with our unit-norm alternative, False,
  held-out EV was 0.854–0.856 over seeds 42–44 against 0.859–0.862 with it). SAELens scales
  AuxK by ``min(n_dead / k_aux, 1)``.
* Step-mode JumpReLU: both leave decoder rows free (same start, norm 1); ours can keep them at
  unit norm instead (``jumprelu_unit_norm_decoder``, Gemma Scope's recipe).
* BatchTopK/Matryoshka are evaluated as saved, i.e. as JumpReLU SAEs with the EMA threshold
  (both tools: rate 0.01 from 0, so after 245 steps it has covered about 91% of the way, and
  held-out L0 sits somewhat above k).
* Dead latents: SAELens counts a latent dead after more than ``dead_feature_window`` silent
  steps, we after that many (one step apart).
* Random initial weights differ (each tool draws its own; same seed, different recipe:
  SAELens Kaiming-uniform rows rescaled, ours Gaussian directions).
* tokens/s: SAELens's TopK runs dense ``[batch, d_sae]`` latents (its sparse option crashes on
  CPU, ANCHORS.md); our TopK family uses sparse kernels. That is what is being measured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import click
import torch

from pipeline.cache import ActivationCache
from pipeline.config import EvalConfig, TrainConfig
from pipeline.constants import SAE_CFG_FILENAME, SPARSITY_FILENAME
from pipeline.evaluate import load_cache_model, evaluate, reconstruction_metrics
from pipeline.loader import ActivationLoader
from pipeline.training import activation_scale, init_b_dec, sample_activations, train

ARCHITECTURES = ("standard", "gated", "topk", "batchtopk", "jumprelu", "matryoshka")
SAELENS_NAMES = {"standard": "standard", "gated": "gated", "topk": "topk", "batchtopk": "batchtopk",
                 "jumprelu": "jumprelu", "matryoshka": "matryoshka_batchtopk"}
# SAELens saves BatchTopK-family SAEs as JumpReLU SAEs (threshold = the learnt batch threshold).
SAELENS_INFERENCE_ARCHITECTURE = {"batchtopk": "jumprelu", "matryoshka": "jumprelu"}
TARGET_L0 = 32.0

# The anchor setup shared by every architecture (TrainConfig field names).
COMMON = {"d_sae": 4608, "lr": 4e-4, "train_batch_size_tokens": 4096, "seed": 42}
# Per-architecture settings besides the sparsity coefficient (given to both tools). With only
# 245 Adam steps, λ alone cannot bring two of the architectures to L0 ≈ 32, because Adam moves
# each bias or threshold by about lr per step whatever λ is:
# * standard at lr 4e-4 settles at held-out L0 ≈ 300 (λ = 20, EV ≈ 0.5, 1M tokens); at λ = 200 it
#   collapses (EV ≈ 0) with L0 still ≈ 390. At lr 4e-3, λ = 5 gives L0 33 at 200K tokens.
# * jumprelu (step mode, θ trained only through the straight-through estimator) moves θ by at
#   most ~lr · steps ≈ 0.1, so L0 is set by the initial θ (in units of the normalised
#   pre-activation; both tools start from unit-norm decoder rows): θ₀ = 0.01 (default) gives
#   L0 ≈ 1,800 at 200K tokens, θ₀ = 1.0 gives ≈ 104 for λ = 1 and λ = 10 alike, θ₀ = 1.5 gives 35
#   (measured with unit-norm decoder rows, before free rows became our default).
ARCHITECTURE_SETTINGS: dict[str, dict[str, Any]] = {
    "standard": {"lr": 4e-3},
    "gated": {},
    "topk": {"k": 32},
    "batchtopk": {"k": 32},
    "jumprelu": {"jumprelu_init_threshold": 1.5},
    "matryoshka": {"k": 32, "matryoshka_widths": [128, 512, 2048, 4608]},
}
# Settings given to OUR run only, to compare at matched L0 where the same setting lands the two
# tools at different L0s. jumprelu: at θ₀ 1.5 SAELens reaches held-out L0 22.4 and ours 20.2 (EV
# 0.842 vs 0.843); θ₀ 1.4 brings ours to 22.8. gated: at λ 150 SAELens reaches held-out L0 47.3 and
# ours 35.9 (EV 0.406 both; CE loss recovered 0.129 vs 0.123); ours at λ 110 reaches 58.4 (0.442,
# 0.142), and λ 126 (log-log interpolation of those two) brings ours to 47.6 (0.429, 0.129).
OURS_ONLY_SETTINGS: dict[str, dict[str, Any]] = {"jumprelu": {"jumprelu_init_threshold": 1.4},
                                                 "gated": {"l1_coefficient": 126.0}}
# Which TrainConfig field holds the calibrated sparsity coefficient.
SPARSITY_FIELDS = {"standard": "l1_coefficient", "gated": "l1_coefficient", "jumprelu": "l0_coefficient"}
# λ for held-out L0 ≈ 32, given to both tools. NOT from a full `--calibrate` run (its bisection
# needs ~4–6 runs of 1–3 minutes per architecture on 2 cores, and 200K-token L0s overstate the
# 1M-token L0 by about 2× for L1 penalties): chosen from a few short runs of OUR trainer, settings
# as above, held-out L0 (EV) after the tokens shown:
# * standard (lr 4e-3): λ 5 → 33 (0.65), λ 20 → 11 (0.46) at 200K tokens.
# * gated (lr 4e-4; decoder live in both gate terms, as SAELens): λ 20 → 592 (0.49) at 200K
#   (SAELens: 627 (0.49)); at 1M tokens λ 50 → 92 (0.47), λ 150 → 36 (0.41).
# * jumprelu (θ₀ 1.5): λ 1 → 35 at 200K; λ barely moves L0 within this budget (see above).
# Rerun `--calibrate` (optionally with --calibrate-tokens 1000000) to refine them.
SPARSITY_COEFFICIENTS: dict[str, float] = {
    "standard": 5.0,
    "gated": 150.0,
    "jumprelu": 1.0,
}


def train_config(arch: str, cache_path: str, training_tokens: int, output_path: Path,
                 coefficient: float | None = None, seed: int | None = None) -> TrainConfig:
    """The TrainConfig of ``arch`` in the anchor setup (``coefficient`` and ``seed`` override the
    default λ and seed)."""
    data: dict[str, Any] = {"cache_path": cache_path, "architecture": arch, "training_tokens": training_tokens,
                            "output_path": str(output_path), "overwrite": True, **COMMON,
                            **ARCHITECTURE_SETTINGS[arch]}
    if seed is not None:
        data["seed"] = seed
    if arch in SPARSITY_FIELDS:
        data[SPARSITY_FIELDS[arch]] = SPARSITY_COEFFICIENTS[arch] if coefficient is None else coefficient
    return TrainConfig.from_dict(data)


def coefficient_of(cfg: TrainConfig) -> float | None:
    return getattr(cfg, SPARSITY_FIELDS[cfg.architecture]) if cfg.architecture in SPARSITY_FIELDS else None


# ------------------------------------------------------------------------------------- SAELens
def saelens_config(cfg: TrainConfig, d_in: int, metadata: dict[str, Any]):
    """SAELens's training-SAE config of the same architecture and settings as ``cfg``."""
    from sae_lens.registry import get_sae_training_class
    from sae_lens.saes.sae import SAEMetadata

    arch = cfg.architecture
    _, cfg_class = get_sae_training_class(SAELENS_NAMES[arch])
    fields: dict[str, Any] = {"d_in": d_in, "d_sae": cfg.d_sae, "dtype": cfg.dtype, "device": cfg.device,
                              "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
                              "normalize_activations": cfg.normalize_activations,
                              "metadata": SAEMetadata(**metadata)}
    if arch in ("standard", "gated"):
        fields.update(l1_coefficient=cfg.l1_coefficient, l1_warm_up_steps=cfg.l1_warm_up_steps)
    if arch == "jumprelu":
        fields.update(l0_coefficient=cfg.l0_coefficient, l0_warm_up_steps=cfg.l0_warm_up_steps,
                      jumprelu_init_threshold=cfg.jumprelu_init_threshold,
                      jumprelu_bandwidth=cfg.jumprelu_bandwidth,
                      jumprelu_sparsity_loss_mode=cfg.jumprelu_sparsity_loss_mode,
                      jumprelu_tanh_scale=cfg.jumprelu_tanh_scale,
                      pre_act_loss_coefficient=cfg.pre_act_loss_coefficient)
    if arch == "jumprelu":
        fields.update(jumprelu_ste_to_input=False)  # DeepMind's STE (θ only), as ours
        if cfg.jumprelu_sparsity_loss_mode == "step":
            fields.update(decoder_init_norm=1.0)  # our step-mode JumpReLU starts at unit-norm rows
    if arch in ("topk", "batchtopk", "matryoshka"):
        # Our TopK family starts from unit-norm decoder rows (Gao et al. 2024, A.1).
        fields.update(k=int(cfg.k) if arch == "topk" else cfg.k, aux_loss_coefficient=cfg.aux_loss_coefficient,
                      decoder_init_norm=1.0, rescale_acts_by_decoder_norm=cfg.rescale_acts_by_decoder_norm)
    if arch in ("batchtopk", "matryoshka"):
        fields.update(topk_threshold_lr=cfg.topk_threshold_lr)
    if arch == "matryoshka":
        fields.update(matryoshka_widths=list(cfg.matryoshka_widths))
    return cfg_class(**fields)


class CountingProvider:
    """Iterator over our loader's batches that counts them and fingerprints the stream."""

    def __init__(self, batches: Iterator[torch.Tensor]):
        self._batches = batches
        self.n_batches = 0
        self._hash = hashlib.sha256()

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        batch = next(self._batches)
        self.n_batches += 1
        self._hash.update(batch[:, :8].contiguous().numpy().tobytes())
        return batch

    @property
    def fingerprint(self) -> str:
        return self._hash.hexdigest()[:16]


def make_loader(cfg: TrainConfig, cache: ActivationCache, hook: str) -> ActivationLoader:
    """The loader ``pipeline.training.train`` builds for ``cfg`` (same arguments, same batches)."""
    exclude = cache.special_token_ids if cfg.exclude_special_tokens else []
    return ActivationLoader(cache, hook, batch_size=cfg.train_batch_size_tokens,
                            shuffle_buffer_tokens=cfg.shuffle_buffer_tokens, seed=cfg.seed,
                            num_workers=cfg.num_workers, prefetch_batches=cfg.prefetch_batches,
                            exclude_token_ids=exclude, device=cfg.device)


def saelens_scale_estimate(cfg: TrainConfig, cache: ActivationCache, hook: str, d_in: int) -> float:
    """The factor SAELens's ActivationScaler estimates over one epoch of a separate loader."""
    from sae_lens.training.activation_scaler import ActivationScaler

    loader = make_loader(cfg, cache, hook)
    n = max(1, loader.rows_per_epoch() // cfg.train_batch_size_tokens)
    scaler = ActivationScaler()
    scaler.estimate_scaling_factor(d_in=d_in, data_provider=iter(loader.batches(n)), n_batches_for_norm_estimate=n)
    return float(scaler.scaling_factor)


def train_saelens(cfg: TrainConfig, output_path: Path) -> dict[str, Any]:
    """Train SAELens's SAE of ``cfg.architecture`` on our loader's batches; save the inference form."""
    from safetensors.torch import save_file
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.registry import get_sae_training_class
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(cfg.seed)
    cache = ActivationCache.open(cfg.cache_path)
    hook = cache.resolve_hook(cfg.hook_name)
    d_in = cache.d_in_of(hook)
    scale = activation_scale(cache.statistics(hook)["mean_norm"], d_in, cfg.normalize_activations)
    a = cache.attrs
    metadata = {"hook_name": hook, "model_name": a["model_name"], "context_size": a["context_size"],
                "prepend_bos": a.get("prepend_bos", False), "dataset_path": a.get("dataset_path", "")}
    sae_class, _ = get_sae_training_class(SAELENS_NAMES[cfg.architecture])
    sl_cfg = saelens_config(cfg, d_in, metadata)
    settings = {f.name: getattr(sl_cfg, f.name) for f in dataclasses.fields(sl_cfg) if f.name != "metadata"}
    sae = sae_class(sl_cfg)
    exclude = cache.special_token_ids if cfg.exclude_special_tokens else []
    init_b_dec(sae, sample_activations(cache, hook, 16_384, cfg.seed, exclude) * scale, cfg.b_dec_init_method)
    steps = cfg.total_steps
    provider = CountingProvider(make_loader(cfg, cache, hook).batches(steps))
    trainer = SAETrainer(
        cfg=SAETrainerConfig(
            total_training_samples=steps * cfg.train_batch_size_tokens,
            train_batch_size_samples=cfg.train_batch_size_tokens,
            lr=cfg.lr, lr_end=cfg.lr / 10, lr_scheduler_name=cfg.lr_scheduler_name,
            lr_warm_up_steps=cfg.lr_warm_up_steps, lr_decay_steps=cfg.lr_decay_steps,
            adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, device=cfg.device,
            dead_feature_window=cfg.dead_feature_window, feature_sampling_window=cfg.feature_sampling_window,
            logger=LoggingConfig(log_to_wandb=False)),
        sae=sae, data_provider=provider)
    if cfg.normalize_activations == "expected_average_only_in":
        trainer.activation_scaler.scaling_factor = scale  # fit() then skips its own estimate
    t0 = time.perf_counter()
    trainer.fit()
    elapsed = time.perf_counter() - t0
    if provider.n_batches != steps:
        raise RuntimeError(f"SAELens drew {provider.n_batches} batches for {steps} steps; the streams differ.")
    _clear_sae_folder(output_path)
    sae.save_inference_model(output_path)
    save_file({"sparsity": trainer.log_feature_sparsity.float().contiguous()}, output_path / SPARSITY_FILENAME)
    return {"train_tokens_per_second": provider.n_batches * cfg.train_batch_size_tokens / elapsed,
            "batches": provider.n_batches, "batch_stream_fingerprint": provider.fingerprint,
            "activation_scale": scale, "dead_features_at_end": int(trainer.dead_neurons.sum()),
            "saelens_config": settings}


def _clear_sae_folder(path: Path) -> None:
    """Remove a previous SAE folder at ``path`` (only one holding cfg.json); create it empty."""
    if path.exists():
        if not (path / SAE_CFG_FILENAME).is_file():
            raise click.ClickException(f"{path} exists and is not an SAE folder; choose another --workdir.")
        shutil.rmtree(path)
    path.mkdir(parents=True)


# ---------------------------------------------------------------------------------------- ours
@contextlib.contextmanager
def recording_loader() -> Iterator[list[CountingProvider]]:
    """While active, every loader ``pipeline.training.train`` builds fingerprints what it serves."""
    import pipeline.training as training

    streams: list[CountingProvider] = []
    original = training.ActivationLoader

    class Recording(original):  # type: ignore[misc, valid-type]
        def batches(self, *args, **kwargs):
            streams.append(CountingProvider(super().batches(*args, **kwargs)))
            return streams[-1]

    training.ActivationLoader = Recording
    try:
        yield streams
    finally:
        training.ActivationLoader = original


def train_ours(cfg: TrainConfig) -> dict[str, Any]:
    """Train our SAE with ``pipeline.training.train``; the batches it drew are fingerprinted."""
    with recording_loader() as streams:
        result = train(cfg)
    (stream,) = streams
    return {"train_tokens_per_second": result.tokens_per_second, "batches": stream.n_batches,
            "batch_stream_fingerprint": stream.fingerprint,
            "dead_features_at_end": int((result.state.steps_since_fired >= cfg.dead_feature_window).sum())}


# --------------------------------------------------------------------------------- calibration
def probe(arch: str, cache_path: str, tokens: int, coefficient: float, workdir: Path) -> dict[str, float]:
    """Held-out L0 and explained variance of OUR ``arch`` trained for ``tokens`` with sparsity
    coefficient ``coefficient`` (no CE loss: the probe only steers λ)."""
    cfg = train_config(arch, cache_path, tokens, workdir / "calibrate" / arch, coefficient)
    result = train(cfg, progress=False)
    cache = ActivationCache.open(cache_path)
    hook = cache.resolve_hook(cfg.hook_name)
    metrics = reconstruction_metrics(result.sae, cache, hook, exclude_token_ids=cache.special_token_ids)
    return {"l0": float(metrics["l0"]), "explained_variance": float(metrics["explained_variance"])}


def calibrate(arch: str, cache_path: str, tokens: int, workdir: Path, *, target: float = TARGET_L0,
              tolerance: float = 0.1, max_probes: int = 6, factor: float = 4.0,
              start: float | None = None) -> tuple[float, list[dict]]:
    """λ giving held-out L0 within ``tolerance`` (relative) of ``target``, by geometric bisection.

    L0 falls as λ grows. Starting from ``start`` (default: the stored coefficient), λ is
    multiplied or divided by ``factor`` until L0 is bracketed, then the bracket ``[lo, hi]`` is
    halved in log λ (``λ = sqrt(lo · hi)``) until L0 is within tolerance or ``max_probes`` runs are
    spent. Returns the probe within tolerance; failing that, when bracketed, the λ where the line
    through the bracket's two probes in (log λ, log L0) crosses the target (unprobed); else the
    probe closest to the target in log L0. Also returns every probe.
    """
    probes: list[dict] = []

    def run(lam: float) -> float:
        t0 = time.perf_counter()
        probes.append({"coefficient": lam, **probe(arch, cache_path, tokens, lam, workdir),
                       "seconds": time.perf_counter() - t0})
        p = probes[-1]
        click.echo(f"  {arch}: λ={lam:.4g} → L0 {p['l0']:.1f}, EV {p['explained_variance']:.3f} ({p['seconds']:.0f}s)")
        return p["l0"]

    lo = hi = None  # probes with L0 above / below the target
    lam = SPARSITY_COEFFICIENTS[arch] if start is None else start
    while len(probes) < max_probes:
        l0 = run(lam)
        if abs(l0 / target - 1) <= tolerance:
            return lam, probes
        if l0 > target:
            lo = probes[-1]
        else:
            hi = probes[-1]
        if lo is None:
            lam = hi["coefficient"] / factor
        elif hi is None:
            lam = lo["coefficient"] * factor
        else:
            lam = math.sqrt(lo["coefficient"] * hi["coefficient"])
    if lo is not None and hi is not None and lo["l0"] > 0 and hi["l0"] > 0:
        slope = math.log(hi["l0"] / lo["l0"]) / math.log(hi["coefficient"] / lo["coefficient"])
        return lo["coefficient"] * math.exp(math.log(target / lo["l0"]) / slope), probes
    best = min(probes, key=lambda p: abs(math.log(max(p["l0"], 1e-3) / target)))
    return best["coefficient"], probes


# ------------------------------------------------------------------------------------------ CLI
def _parse_architectures(text: str) -> list[str]:
    from pipeline.sae.registry import ARCHITECTURES as REGISTERED

    archs = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in archs if a not in ARCHITECTURES]
    if unknown:
        raise click.BadParameter(f"unknown architecture(s) {unknown}; choose from {', '.join(ARCHITECTURES)}.")
    needed = set(archs) | {SAELENS_INFERENCE_ARCHITECTURE[a] for a in archs if a in SAELENS_INFERENCE_ARCHITECTURE}
    missing = sorted(needed - set(REGISTERED))
    if missing:
        raise click.BadParameter(
            f"sae-pipeline has no {', '.join(missing)} architecture registered (pipeline/sae/registry.py); "
            f"registered: {', '.join(REGISTERED)}. (SAELens saves batchtopk and matryoshka as jumprelu.)")
    return archs


def _fmt(value: Any, spec: str, width: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—".rjust(width)
    return format(value, f">{width}{spec}")


def print_table(rows: list[dict[str, Any]]) -> None:
    click.echo(f"\n{'architecture':<13}{'tool':<17}{'λ':>8}{'L0':>8}{'EV':>8}{'CE rec':>8}{'dead':>8}"
               f"{'train tok/s':>13}")
    for r in rows:
        click.echo(f"{r['architecture']:<13}{r['tool']:<17}{_fmt(r.get('coefficient'), '.3g', 8)}"
                   f"{_fmt(r.get('l0'), '.1f', 8)}{_fmt(r.get('explained_variance'), '.3f', 8)}"
                   f"{_fmt(r.get('ce_loss_recovered'), '.3f', 8)}{_fmt(r.get('dead_fraction'), '.3f', 8)}"
                   f"{_fmt(r.get('train_tokens_per_second'), ',.0f', 13)}")


@click.command()
@click.option("--cache", "cache_path", default="data/harvests/anchor_wikitext", show_default=True,
              help="Activation cache of the anchor harvest (configs/anchor_wikitext.yaml).")
@click.option("--architectures", default=",".join(ARCHITECTURES), show_default=True,
              help="Comma-separated architectures (sae-pipeline names; matryoshka is SAELens's matryoshka_batchtopk).")
@click.option("--training-tokens", default=1_000_000, show_default=True, type=int)
@click.option("--out", default="data/bench/architectures.json", show_default=True, help="JSON results file.")
@click.option("--workdir", default="data/bench/architectures", show_default=True,
              help="Where the trained SAEs go (<workdir>/<architecture>/{ours,saelens}).")
@click.option("--n-ce-sequences", default=64, show_default=True, type=int,
              help="Holdout sequences for CE loss recovered (0 skips it).")
@click.option("--calibrate", is_flag=True,
              help="Instead of the benchmark, search the λ giving L0 ≈ 32 for standard/gated/jumprelu "
                   "with short runs of our trainer.")
@click.option("--calibrate-tokens", default=200_000, show_default=True, type=int)
@click.option("--seed", default=COMMON["seed"], show_default=True, type=int,
              help="Seed of both tools' initial weights and of the (shared) batch order.")
@click.option("--max-probes", default=6, show_default=True, type=int,
              help="Training runs per architecture when calibrating.")
def main(cache_path: str, architectures: str, training_tokens: int, out: str, workdir: str, n_ce_sequences: int,
         calibrate: bool, calibrate_tokens: int, seed: int, max_probes: int) -> None:
    archs = _parse_architectures(architectures)
    work = Path(workdir)
    if calibrate:
        _run_calibration([a for a in archs if a in SPARSITY_FIELDS], cache_path, calibrate_tokens, work, max_probes, out)
        return
    cache = ActivationCache.open(cache_path)
    model = load_cache_model(cache, "cpu") if n_ce_sequences > 0 else None
    rows: list[dict[str, Any]] = []
    for arch in archs:
        cfg = train_config(arch, cache_path, training_tokens, work / arch / "ours", seed=seed)
        hook = cache.resolve_hook(cfg.hook_name)
        sl_path = work / arch / "saelens"
        click.echo(f"\n=== {arch}: ours ===")
        t0 = time.perf_counter()
        ours_cfg = dataclasses.replace(cfg, **OURS_ONLY_SETTINGS.get(arch, {}))
        ours = {"architecture": arch, "tool": "sae-pipeline", "coefficient": coefficient_of(ours_cfg), "lr": cfg.lr,
                "ours_only_settings": OURS_ONLY_SETTINGS.get(arch, {}), "sae_path": cfg.output_path,
                **train_ours(ours_cfg), "wall_seconds": time.perf_counter() - t0}
        click.echo(f"=== {arch}: SAELens ({SAELENS_NAMES[arch]}) ===")
        t0 = time.perf_counter()
        theirs = {"architecture": arch, "tool": "SAELens 6.54.12", "coefficient": coefficient_of(cfg), "lr": cfg.lr,
                  "sae_path": str(sl_path), **train_saelens(cfg, sl_path), "wall_seconds": time.perf_counter() - t0,
                  "saelens_scale_estimate": saelens_scale_estimate(cfg, cache, hook, cache.d_in_of(hook))}
        if ours["batch_stream_fingerprint"] != theirs["batch_stream_fingerprint"]:
            raise click.ClickException(f"{arch}: SAELens was fed other batches than our trainer.")
        for row in (ours, theirs):
            metrics = evaluate(EvalConfig.from_dict({
                "sae_path": row["sae_path"], "cache_path": cache_path, "ce_loss": n_ce_sequences > 0,
                "n_ce_sequences": max(1, n_ce_sequences),
                "output_path": str(Path(row["sae_path"]) / "bench_metrics.json")}), model=model)
            row.update(metrics)
            rows.append(row)
        print_table(rows)
    print_table(rows)
    setup = {"cache": cache_path, "training_tokens": training_tokens, **COMMON, "seed": seed,
             "architecture_settings": ARCHITECTURE_SETTINGS, "ours_only_settings": OURS_ONLY_SETTINGS,
             "sparsity_coefficients": SPARSITY_COEFFICIENTS,
             "n_ce_sequences": n_ce_sequences, "torch_threads": torch.get_num_threads()}
    _write_json(out, {"setup": setup, "results": rows})


def _run_calibration(archs: list[str], cache_path: str, tokens: int, work: Path, max_probes: int, out: str) -> None:
    if not archs:
        raise click.UsageError("--calibrate needs at least one of standard, gated, jumprelu in --architectures.")
    chosen, report = {}, {}
    for arch in archs:
        click.echo(f"calibrating {arch} ({SPARSITY_FIELDS[arch]}) at {tokens:,} tokens for L0 ≈ {TARGET_L0:g}")
        chosen[arch], report[arch] = calibrate(arch, cache_path, tokens, work, max_probes=max_probes)
        shutil.rmtree(work / "calibrate" / arch, ignore_errors=True)
    click.echo(f"\n# --calibrate, {tokens:,} tokens, target L0 {TARGET_L0:g}")
    click.echo("SPARSITY_COEFFICIENTS = {")
    for arch, lam in chosen.items():
        probed = ", ".join(f"{p['coefficient']:.3g}→{p['l0']:.1f} (EV {p['explained_variance']:.2f})"
                           for p in report[arch])
        click.echo(f"    {arch!r}: {lam:.3g},  # probes λ→L0: {probed}")
    click.echo("}")
    _write_json(str(Path(out).with_name(Path(out).stem + "_calibration.json")),
                {"tokens": tokens, "target_l0": TARGET_L0, "chosen": chosen, "probes": report})


def _write_json(path: str, data: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2, default=float) + "\n")
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
