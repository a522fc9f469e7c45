"""Training throughput and quality, ours and SAELens 6.54.12, on the same real activations.

The setup of ../shared/ANCHORS.md ("TopK training step"): rows of a real cache (SmolLM2-135M
``blocks.8.hook_resid_post``, WikiText-2) scaled as training scales them, ``n_train_tokens``
training rows cycled as batches of ``batch_size``, the first ``n_holdout_tokens`` rows of the
holdout chunks for quality. Each variant trains one SAE from the same seed for ``steps`` steps:

* speed: the first ``warmup_steps`` are not timed; the rest are timed in blocks of ``block_steps``
  and the figure is the median block's tokens/s (so speed and quality come from one run);
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

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from pipeline.bench.measure import Row
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
    rows = []
    for c in cache.holdout_chunks:
        x = cache.read_chunk(hook, c).float()
        rows.append(x[torch.from_numpy(~np.isin(cache.chunk_token_ids(c), np.asarray(special, np.int64)))])
    holdout = (torch.cat(rows)[: bench.n_holdout_tokens] * scale).to(bench.device)
    return Data(cache, hook, train, holdout, scale)


def train_config(bench: StepBench, data: Data, **extra: Any) -> TrainConfig:
    return TrainConfig.from_dict({
        "cache_path": str(data.cache.path), "hook_name": data.hook, "architecture": bench.architecture,
        "d_sae": bench.d_sae, "lr": bench.lr, "train_batch_size_tokens": bench.batch_size,
        "training_tokens": bench.steps * bench.batch_size, "seed": bench.seed, "device": bench.device,
        **bench.settings, **extra})


def timed_steps(step: Callable[[torch.Tensor], Any], data: Data, bench: StepBench) -> tuple[float, list[float]]:
    """Run ``bench.steps`` calls of ``step`` over the cycled training batches.

    Returns:
        ``(median tokens/s over the timed blocks, tokens/s of each block)``.
    """
    batches = data.train.split(bench.batch_size)
    rates: list[float] = []
    t0 = time.perf_counter()
    for i in range(bench.steps):
        step(batches[i % len(batches)])
        done = i + 1 - bench.warmup_steps
        if done >= 0 and done % bench.block_steps == 0:
            _synchronize(bench.device)  # a CUDA step is only done when its kernels are
            if done > 0:
                rates.append(bench.block_steps * bench.batch_size / (time.perf_counter() - t0))
            t0 = time.perf_counter()
    if not rates:
        raise ValueError(f"{bench.case}: steps {bench.steps} leave no timed block after {bench.warmup_steps} "
                         f"warm-up steps of blocks of {bench.block_steps}; raise steps.")
    return statistics.median(rates), rates


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


def run_ours(bench: StepBench, data: Data, *, autocast: bool = False) -> Row:
    """Our trainer on the bench; ``autocast`` trains with bf16 matmuls."""
    cfg = train_config(bench, data, autocast=autocast)
    torch.manual_seed(cfg.seed)
    sae = build_sae(cfg, data.train.shape[1], data.hook, data.cache.attrs["model_name"], {})
    init_b_dec(sae, data.train[:16_384], cfg.b_dec_init_method)
    trainer = Trainer(sae, cfg)
    median, rates = timed_steps(trainer.step, data, bench)
    sae.eval()
    quality = held_out_quality(sae.encode, sae.decode, data.holdout, bench.d_sae)
    return Row(bench.case, "ours bf16" if autocast else "ours fp32", median, "tokens/s", rates, quality,
               _row_config(bench, data), reference="SAELens")


def run_saelens(bench: StepBench, data: Data) -> Row:
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

    median, rates = timed_steps(step, data, bench)
    sae.eval()
    quality = held_out_quality(sae.encode, sae.decode, data.holdout, bench.d_sae)
    return Row(bench.case, "SAELens", median, "tokens/s", rates, quality, _row_config(bench, data))


def _row_config(bench: StepBench, data: Data) -> dict[str, Any]:
    return {**bench.__dict__, "settings": dict(bench.settings), "cache": str(data.cache.path), "hook": data.hook,
            "d_in": int(data.train.shape[1]), "torch_threads": torch.get_num_threads()}


def training_rows(cache_path: str, benches: list[StepBench], *, saelens: bool = True, bf16: bool = True) -> list[Row]:
    """Ours fp32 (and bf16), and SAELens, on each bench; ours reference SAELens."""
    rows = []
    for bench in benches:
        data = load_data(cache_path, bench)
        rows.append(run_ours(bench, data))
        if bf16:
            rows.append(run_ours(bench, data, autocast=True))
        if saelens:
            rows.append(run_saelens(bench, data))
    return rows


def scaling_rows(cache_path: str, base: StepBench, d_saes=(2304, 4608, 9216), ks=(16, 32, 64, 128)) -> list[Row]:
    """Our fp32 TopK tokens/s as d_sae grows (k fixed) and as k grows (d_sae fixed); each row
    references the smallest of its series, so ``ratio`` is the relative speed."""
    data = load_data(cache_path, base)
    rows = []
    for d_sae in d_saes:
        b = StepBench(**{**base.__dict__, "case": "scaling_d_sae", "d_sae": d_sae})
        rows.append(_renamed(run_ours(b, data), f"d_sae {d_sae}", f"d_sae {d_saes[0]}"))
    for k in ks:
        b = StepBench(**{**base.__dict__, "case": "scaling_k", "settings": {**base.settings, "k": k}})
        rows.append(_renamed(run_ours(b, data), f"k {k}", f"k {ks[0]}"))
    return rows


def _renamed(row: Row, variant: str, reference: str) -> Row:
    row.variant, row.reference = variant, reference
    return row
