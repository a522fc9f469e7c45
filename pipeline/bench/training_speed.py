"""Training throughput and quality, ours and SAELens 6.54.12, on the same real activations.

The setup of ../shared/ANCHORS.md ("TopK training step"): rows of a real cache (SmolLM2-135M
``blocks.8.hook_resid_post``, WikiText-2) scaled as training scales them, ``n_train_tokens``
training rows cycled as batches of ``batch_size``, the first ``n_holdout_tokens`` rows of the
holdout chunks for quality. Each variant trains one SAE from the same seed for ``steps`` steps:

* speed: the first ``warmup_steps`` are not timed; the rest are timed in blocks of ``block_steps``
  and the figure is the median block's tokens/s (so speed and quality come from one run). The
  variants of a case take turns block by block (:func:`interleaved_rates`), and each row compared
  with another carries ``paired_ratio``, the median of the per-round ratios: the goals use it,
  since a shared machine's speed drifts more between minutes than between neighbouring blocks;
* quality: held-out explained variance, L0 and dead fraction after the last step, computed by
  :class:`pipeline.evals.ReconstructionStats` for both tools on the same held-out rows (what
  ``sae-pipeline evaluate`` reports).

Variants: ``ours fp32`` (:class:`pipeline.training.Trainer`, sparse TopK kernels), ``ours bf16``
(the same with ``autocast``: bfloat16 matmuls, fp32 weights and Adam state), ``SAELens``
(its training SAE and ``SAETrainer.step``, with the loss settings of
:func:`pipeline.bench.architectures.saelens_config`, so the same config means the same
objective). ``scaling_rows`` times ours alone over d_sae and k.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from pipeline.bench.measure import Row, interleaved_calls, paired_ratio
from pipeline.cache import ActivationCache
from pipeline.config import TrainConfig
from pipeline.evals import ReconstructionStats
from pipeline.training import Trainer, activation_scale, build_sae, init_b_dec, sample_activations


@dataclass
class StepBench:
    """One training case: which SAE and how long to run it (TrainConfig field names)."""

    case: str
    architecture: str = "topk"
    d_sae: int = 4608
    settings: dict[str, Any] = field(default_factory=lambda: {"k": 32})
    batch_size: int = 4096
    lr: float = 4e-4
    n_train_tokens: int = 65_536
    n_holdout_tokens: int = 8_192
    steps: int = 200
    warmup_steps: int = 20
    block_steps: int = 30
    seed: int = 42
    device: str = "cpu"


@dataclass
class Variant:
    """One trainer under test: its row name, one training step on a batch, its held-out quality
    after training, and the variant its speed is compared with."""

    name: str
    step: Callable[[torch.Tensor], Any]
    quality: Callable[[], dict[str, float]]
    reference: str | None = None


@dataclass
class Data:
    """Scaled training and held-out rows (float32) of one hook of a cache."""

    cache: ActivationCache
    hook: str
    train: torch.Tensor  # [n_train_tokens, d_in]
    holdout: torch.Tensor  # [n_holdout_tokens, d_in]
    scale: float


def load_data(cache_path: str, bench: StepBench, hook: str | None = None) -> Data:
    """Rows sampled (seeded) from the training chunks and the first holdout rows, non-special
    tokens only, times the ``expected_average_only_in`` factor training would apply."""
    cache = ActivationCache.open(cache_path)
    hook = cache.resolve_hook(hook)
    scale = activation_scale(cache.statistics(hook)["mean_norm"], cache.d_in_of(hook), "expected_average_only_in")
    special = cache.special_token_ids
    train = (sample_activations(cache, hook, bench.n_train_tokens, bench.seed, special) * scale).to(bench.device)
    rows = [cache.read_kept_rows(hook, c, special).float() for c in cache.holdout_chunks]
    holdout = (torch.cat(rows)[: bench.n_holdout_tokens] * scale).to(bench.device)
    return Data(cache, hook, train, holdout, scale)


def train_config(bench: StepBench, data: Data, **extra: Any) -> TrainConfig:
    return TrainConfig.from_dict({
        "cache_path": str(data.cache.path), "hook_name": data.hook, "architecture": bench.architecture,
        "d_sae": bench.d_sae, "lr": bench.lr, "train_batch_size_tokens": bench.batch_size,
        "training_tokens": bench.steps * bench.batch_size, "seed": bench.seed, "device": bench.device,
        **bench.settings, **extra})


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def held_out_quality(encode: Callable, decode: Callable, holdout: torch.Tensor, d_sae: int,
                     batch_size: int = 4096) -> dict[str, float]:
    """Explained variance, L0 and dead fraction of an SAE's inference path on ``holdout``."""
    stats = ReconstructionStats(d_sae)
    for x in holdout.split(batch_size):
        feats = encode(x)
        stats.update(x, decode(feats), feature_acts=feats)
    m = stats.compute()
    return {k: float(m[k]) for k in ("explained_variance", "l0", "dead_fraction")}


def ours_variant(bench: StepBench, data: Data, *, autocast: bool = False) -> Variant:
    """Our trainer on the bench; ``autocast`` trains with bf16 matmuls."""
    cfg = train_config(bench, data, autocast=autocast)
    torch.manual_seed(cfg.seed)
    sae = build_sae(cfg, data.train.shape[1], data.hook, data.cache.attrs["model_name"], {})
    init_b_dec(sae, data.train[:16_384], cfg.b_dec_init_method)
    trainer = Trainer(sae, cfg)

    def quality() -> dict[str, float]:
        sae.eval()
        return held_out_quality(sae.encode, sae.decode, data.holdout, bench.d_sae)

    return Variant("ours bf16" if autocast else "ours fp32", trainer.step, quality, reference="SAELens")


def saelens_variant(bench: StepBench, data: Data) -> Variant:
    """SAELens's training SAE of the same architecture, stepped by its own ``SAETrainer``."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.registry import get_sae_training_class
    from sae_lens.training.sae_trainer import SAETrainer

    from pipeline.bench.architectures import SAELENS_NAMES, saelens_config

    cfg = train_config(bench, data)
    torch.manual_seed(cfg.seed)
    a = data.cache.attrs
    metadata = {"hook_name": data.hook, "model_name": a["model_name"], "context_size": a["context_size"]}
    sae_class, _ = get_sae_training_class(SAELENS_NAMES[cfg.architecture])
    sae = sae_class(saelens_config(cfg, data.train.shape[1], metadata))
    init_b_dec(sae, data.train[:16_384], cfg.b_dec_init_method)
    trainer = SAETrainer(
        cfg=SAETrainerConfig(
            total_training_samples=bench.steps * bench.batch_size, train_batch_size_samples=bench.batch_size,
            lr=cfg.lr, lr_end=cfg.lr / 10, lr_scheduler_name="constant", lr_warm_up_steps=0, lr_decay_steps=0,
            adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, device=cfg.device,
            dead_feature_window=cfg.dead_feature_window, feature_sampling_window=cfg.feature_sampling_window,
            logger=LoggingConfig(log_to_wandb=False)),
        sae=sae, data_provider=iter(()))

    def step(x: torch.Tensor) -> None:
        trainer.step(x)  # rows are already scaled: SAELens's scaler has no factor, so it passes them on
        trainer.n_training_steps += 1

    def quality() -> dict[str, float]:
        sae.eval()
        return held_out_quality(sae.encode, sae.decode, data.holdout, bench.d_sae)

    return Variant("SAELens", step, quality)


def _row_config(bench: StepBench, data: Data) -> dict[str, Any]:
    return {**bench.__dict__, "settings": dict(bench.settings), "cache": str(data.cache.path), "hook": data.hook,
            "d_in": int(data.train.shape[1]), "torch_threads": torch.get_num_threads()}


def training_rows(cache_path: str, benches: list[StepBench], *, saelens: bool = True, bf16: bool = True) -> list[Row]:
    """Ours fp32 (and bf16), and SAELens, on each bench, timed in interleaved blocks; ours
    reference SAELens."""
    rows = []
    for bench in benches:
        data = load_data(cache_path, bench)
        variants = [ours_variant(bench, data)] + ([ours_variant(bench, data, autocast=True)] if bf16 else [])
        variants += [saelens_variant(bench, data)] if saelens else []
        rows += measured_rows(variants, data, bench, {v.name: bench for v in variants})
    return rows


def measured_rows(variants: list[Variant], data: Data, bench: StepBench,
                  configs: dict[str, StepBench]) -> list[Row]:
    """One row per variant (case ``bench.case``): the median of its blocks' tokens/s from
    :func:`interleaved_rates`, its held-out quality, and ``paired_ratio``: the median over rounds
    of its rate over its reference's in the same round."""
    rates = interleaved_rates(variants, data, bench)
    rows = []
    for v in variants:
        quality = v.quality()
        ref = rates.get(v.reference) if v.reference else None
        if ref is not None and v.reference != v.name:
            quality["paired_ratio"] = paired_ratio(rates[v.name], ref)
        rows.append(Row(bench.case, v.name, statistics.median(rates[v.name]), "tokens/s", rates[v.name], quality,
                        _row_config(configs[v.name], data), reference=v.reference if ref is not None else None))
    return rows


def interleaved_rates(variants: list[Variant], data: Data, bench: StepBench) -> dict[str, list[float]]:
    """Tokens/s of each variant per timed block, the variants taking turns block by block.

    Each variant first runs ``bench.warmup_steps`` untimed steps, then the rounds: in each, every
    variant runs ``bench.block_steps`` timed steps on the same cycled batches. A shared machine's
    speed drifts by 30% within minutes; variants timed in the same round see the same conditions, so
    their per-round ratio is steadier than a ratio of medians taken minutes apart.

    Raises:
        ValueError: ``bench.steps`` leaves no timed block after the warm-up.
    """
    batches = data.train.split(bench.batch_size)
    n_blocks = (bench.steps - bench.warmup_steps) // bench.block_steps
    if n_blocks < 1:
        raise ValueError(f"{bench.case}: steps {bench.steps} leave no timed block after {bench.warmup_steps} "
                         f"warm-up steps of blocks of {bench.block_steps}; raise steps.")
    for v in variants:
        for i in range(bench.warmup_steps):
            v.step(batches[i % len(batches)])
    _synchronize(bench.device)

    def blocks_of(v: Variant) -> Callable[[], int]:
        block = iter(range(n_blocks))

        def run() -> int:
            first = bench.warmup_steps + next(block) * bench.block_steps
            for i in range(first, first + bench.block_steps):
                v.step(batches[i % len(batches)])
            _synchronize(bench.device)  # a CUDA step is only done when its kernels are
            return bench.block_steps * bench.batch_size
        return run

    return interleaved_calls({v.name: blocks_of(v) for v in variants}, repeats=n_blocks, warmup=0)


def scaling_rows(cache_path: str, base: StepBench, d_saes=(2304, 4608, 9216), ks=(16, 32, 64, 128)) -> list[Row]:
    """Our fp32 TopK tokens/s as d_sae grows (k fixed) and as k grows (d_sae fixed), each series
    timed in interleaved blocks; each row references the smallest of its series, so ``ratio``
    (and ``paired_ratio``) is the relative speed."""
    data = load_data(cache_path, base)
    rows = []
    for case, values, vary in (("scaling_d_sae", d_saes, lambda v: {"d_sae": v}),
                               ("scaling_k", ks, lambda v: {"settings": {**base.settings, "k": v}})):
        name = "d_sae" if case == "scaling_d_sae" else "k"
        benches = {f"{name} {v}": StepBench(**{**base.__dict__, "case": case, **vary(v)}) for v in values}
        variants = [dataclasses.replace(ours_variant(b, data), name=n, reference=f"{name} {values[0]}")
                    for n, b in benches.items()]
        rows += measured_rows(variants, data, benches[f"{name} {values[0]}"], benches)
    return rows
