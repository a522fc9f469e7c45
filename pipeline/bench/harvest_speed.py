"""Harvest speed and storage: ours against the model forward alone and against SAELens 6.54.12.

    python -m pipeline.bench.harvest_speed [--quick] [--n-tokens 32768] [--repeats 3]
        [--workdir data/bench/harvest_speed] [--out rows.json]

All variants run over the SAME token rows (``pipeline.harvest.tokenize_dataset`` of one config: the
first ``n_tokens`` of WikiText-2 test in ``context_size`` rows without BOS, as in
../shared/ANCHORS.md) on one model loaded once (a second, bfloat16 copy for the bf16 rows).
Speed is tokens/s, the median of ``repeats`` runs after ``warmup`` (default 1) untimed ones; storage is
bytes/token on disk. The fp32 variants (forward only, ours LZ4 and Zstd, SAELens) take turns run by
run, as do the two bf16 ones and the four ``harvest_hooks`` ones
(:func:`pipeline.bench.measure.interleaved_calls`): in one round every variant meets the same
machine, so the per-round ratios (``paired_ratio``, ``fraction_of_forward``) are steadier than
ratios of medians timed minutes apart. On a CPU both harvests run at the forward's speed, and at
fp32 the forward itself runs near the matrix-product peak (SmolLM2-135M to block 8: about 64
MFLOPs per token, ~2.2K tokens/s at 140 GFLOP/s), so the ours-vs-SAELens ratio is near 1 and only
a paired figure can tell which side of 1 it falls.

Rows of case ``"harvest"`` (tokens/s):

* ``forward only`` (and ``forward only, bf16 compute``): ``model.run_with_cache`` over the rows in
  ``store_batch_size_prompts`` batches, stopped after the hooked block, nothing stored. On a CPU the
  model forward is the limit, so this is the ceiling a harvest can reach.
* ``ours fp32 compute, float16 storage`` (default LZ4 compression), ``... zstd`` and
  ``ours bf16 compute, float16 storage``: ``pipeline.harvest.harvest`` into a fresh folder each run.
  The value is the forward + write loop (``HarvestResult.tokens_per_second``, what a harvest
  prints); ``quality`` adds ``end_to_end_tokens_per_second`` (the whole call: tokenizing, model
  fingerprint, statistics pass), ``fraction_of_forward`` (median over rounds of value / forward-only
  of the same compute dtype; the goal is ≥ 0.9), ``paired_ratio`` (fp32 rows: median over rounds of
  value / SAELens's; the goal "at least SAELens's tokens/s" reads it) and ``bytes_per_token``. The
  bf16 row adds ``cosine_to_fp32`` (mean over tokens of the cosine between its stored activations
  and the fp32-compute cache's) and ``relative_error`` (mean over tokens of
  ``||x_bf16 - x_fp32|| / ||x_fp32||``).
* ``SAELens``: its ``CacheActivationsRunner`` (float32 storage, its default and the ANCHORS.md
  setup: a Hugging Face ``datasets`` folder of ``[context_size, d_in]`` rows plus token ids) over the
  same rows given as a pre-tokenized ``input_ids`` dataset, driving our already-loaded model. The
  value is ``runner.run()`` (forward, shard writes, consolidation); ``end_to_end`` adds building
  the runner.

Our rows reference ``SAELens``. Bytes/token count every file of the output folder (metadata and
token ids included) over the token count; ``bytes_per_token_vs_saelens`` in our rows' ``quality``
is the "at most 0.5×" goal. Rows of case ``"harvest_hooks"`` (tokens/s) are our fp32 harvest
capturing 1, 2, 3 and 4 hooks of the hooked block in one pass (the forward is the same for all, so
the (paired) ratio to ``1 hook`` is what each extra hook costs to copy, compress and write).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import shutil
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import click
import numpy as np
import torch

from pipeline import models
from pipeline.bench.measure import Row, add_ratios, interleaved_calls, paired_ratio
from pipeline.cache import ActivationCache
from pipeline.config import HarvestConfig
from pipeline.harvest import harvest, tokenize_dataset

REPO = Path(__file__).resolve().parents[2]
# configs/anchor_wikitext.yaml names ../shared/data/... relative to the repository root.
DEFAULT_DATASET = REPO.parent / "shared" / "data" / "wikitext2_raw" / "wiki.test.raw"
QUICK = {"n_tokens": 2048, "repeats": 1}
# SAELens's datasets writer has problems with shards over 2 GB (its CacheActivationsRunnerConfig).
SAELENS_MAX_BUFFER_BYTES = 2e9


def harvest_rows(*, model_name: str = "smollm2-135m", hook: str = "blocks.8.hook_resid_post",
                 dataset_path: str | Path = DEFAULT_DATASET, n_tokens: int = 32_768, context_size: int = 128,
                 store_batch_size_prompts: int = 16, repeats: int = 3, warmup: int = 1,
                 workdir: Path, model=None, device: str = "cpu", saelens: bool = True) -> list[Row]:
    """Rows of cases ``harvest`` and ``harvest_hooks`` (see the module docstring).

    ``n_tokens`` is rounded down to whole forward batches (``store_batch_size_prompts`` rows of
    ``context_size``; fewer rows per batch when the harvest has fewer) so SAELens, which only
    writes whole buffers of whole batches, stores exactly the same rows. ``warmup`` untimed runs
    precede the ``repeats`` timed ones of every variant. Folders go under ``workdir``. ``model``:
    ``model_name`` already loaded in float32 on ``device`` (``pipeline.models.load_model``), else it
    is loaded here. ``device``: where the models run (the harvests' ``device``). ``saelens=False``
    leaves SAELens out (no ``SAELens`` row, no ratios to it).
    """
    workdir = Path(workdir)
    model = model if model is not None else models.load_model(model_name, device=device)
    # No holdout: a harvest shrinks its chunks to fit a holdout smaller than 4,096 tokens, and a
    # forward batch never straddles a chunk, so a small benchmark harvest would run smaller forward
    # batches than a real one (and than the forward-only and SAELens rows).
    base = HarvestConfig(model_name=model_name, hook_names=[hook], dataset_path=str(dataset_path),
                         context_size=context_size, n_tokens=n_tokens, holdout_tokens=0, overwrite=True, device=device)
    tokens = tokenize_dataset(base, model.tokenizer)
    batch = min(store_batch_size_prompts, tokens.shape[0])
    tokens = tokens[: tokens.shape[0] // batch * batch]
    base = dataclasses.replace(base, n_tokens=tokens.size, store_batch_size_prompts=batch)
    run = {"repeats": repeats, "warmup": warmup, "torch_threads": torch.get_num_threads(), "interleaved": True}

    fwd = _forward("forward only", model, tokens, base)
    ours = _ours("ours fp32 compute, float16 storage", base, model, workdir / "fp32")
    zstd = _ours("ours fp32 compute, float16 storage, zstd", dataclasses.replace(base, compression="zstd"),
                 model, workdir / "zstd")
    theirs = [_Timed("SAELens", _saelens_work(model, tokens, base, workdir / "saelens"))] if saelens else []
    _rounds([fwd, ours, zstd, *theirs], run)
    model_bf16 = models.load_model(model_name, device=device, dtype=torch.bfloat16)
    fwd_bf16 = _forward("forward only, bf16 compute", model_bf16, tokens, base)
    bf16 = _ours("ours bf16 compute, float16 storage", dataclasses.replace(base, model_dtype="bfloat16"),
                 model_bf16, workdir / "bf16")
    _rounds([fwd_bf16, bf16], run)
    del model_bf16

    ours_rows = [_ours_row(t, tokens, run, forward=f) for t, f in ((ours, fwd), (zstd, fwd), (bf16, fwd_bf16))]
    ours_rows[2].quality.update(compare_caches(workdir / "fp32", workdir / "bf16", hook))
    rows = [_forward_row(fwd, run), _forward_row(fwd_bf16, run), *ours_rows]
    if theirs:
        rows.append(_saelens_row(theirs[0], base, tokens, run))
        for r, t in zip(ours_rows, (ours, zstd, bf16)):
            r.reference = "SAELens"
            r.quality["bytes_per_token_vs_saelens"] = r.quality["bytes_per_token"] / rows[-1].quality["bytes_per_token"]
            if t is not bf16:  # timed in the same rounds as SAELens
                r.quality["paired_ratio"] = paired_ratio(t.rates, theirs[0].rates)
    return add_ratios(rows + _hooks_rows(base, model, tokens, workdir / "hooks", run))


@dataclasses.dataclass
class _Timed:
    """One variant of the case. Calling it runs ``work`` once, which returns ``(tokens, seconds of the
    part the row reports, what it produced)``; ``rates`` keeps that part's tokens/s per call,
    ``whole`` (filled by :func:`_rounds`) the whole call's, ``last`` the last product."""

    variant: str
    work: Callable[[], tuple[int, float, Any]]
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    rates: list[float] = dataclasses.field(default_factory=list)
    whole: list[float] = dataclasses.field(default_factory=list)
    last: Any = None

    def __call__(self) -> int:
        n, seconds, self.last = self.work()
        self.rates.append(n / seconds)
        return n


def _rounds(variants: list[_Timed], run: dict) -> None:
    """Time ``variants`` taking turns call by call (:func:`pipeline.bench.measure.interleaved_calls`),
    keeping the timed calls' rates only."""
    whole = interleaved_calls({v.variant: v for v in variants}, repeats=run["repeats"], warmup=run["warmup"])
    for v in variants:
        v.whole, v.rates = whole[v.variant], v.rates[run["warmup"]:]


def _forward(variant: str, model, tokens: np.ndarray, cfg: HarvestConfig) -> _Timed:
    """The model forward alone over ``tokens``, exactly as the harvest batches and stops it."""
    stop_at = models.stop_at_layer_for(cfg.hook_names)

    def work() -> tuple[int, float, Any]:
        t0 = time.perf_counter()
        with torch.no_grad():
            for s in range(0, tokens.shape[0], cfg.store_batch_size_prompts):
                batch = torch.from_numpy(tokens[s : s + cfg.store_batch_size_prompts].astype(np.int64)).to(cfg.device)
                model.run_with_cache(batch, names_filter=list(cfg.hook_names), stop_at_layer=stop_at)
        if torch.device(cfg.device).type == "cuda":
            torch.cuda.synchronize()  # the forward is only done when its kernels are
        return tokens.size, time.perf_counter() - t0, None
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return _Timed(variant, work, {**_settings(cfg), "model_dtype": dtype, "stop_at_layer": stop_at})


def _forward_row(t: _Timed, run: dict) -> Row:
    return Row("harvest", t.variant, statistics.median(t.rates), "tokens/s", t.rates, config={**t.config, **run})


def _ours(variant: str, cfg: HarvestConfig, model, out: Path) -> _Timed:
    """Our harvest of ``cfg`` into ``out`` (replaced each call); the rate reported is the forward +
    write loop's (``HarvestResult.tokens_per_second``)."""
    cfg = dataclasses.replace(cfg, output_path=str(out))

    def work() -> tuple[int, float, Any]:
        result = harvest(cfg, model=model)
        n = result.cache.layout.n_tokens
        return n, n / result.tokens_per_second, result
    return _Timed(variant, work, {**_settings(cfg), "output_path": str(out)})


def _ours_row(t: _Timed, tokens: np.ndarray, run: dict, forward: _Timed | None) -> Row:
    """Loop tokens/s, end-to-end tokens/s, bytes/token and (with ``forward``, timed in the same
    rounds) ``fraction_of_forward``, the median of the per-round ratios."""
    cache, out = t.last.cache, Path(t.config["output_path"])
    if not np.array_equal(np.asarray(cache.tokens[:]), tokens):
        raise RuntimeError(f"{t.variant}: the harvest stored other token rows than the benchmark's.")
    on_disk = folder_bytes(out) / tokens.size
    quality = {"end_to_end_tokens_per_second": statistics.median(t.whole), "bytes_per_token": on_disk,
               "activation_bytes_per_token": sum(folder_bytes(out / h) for h in t.config["hook_names"]) / tokens.size}
    if forward is not None:
        quality = {"fraction_of_forward": paired_ratio(t.rates, forward.rates), **quality}
    # HarvestResult measures the same folder; a disagreement would mean one of the two is wrong.
    note = "" if math.isclose(t.last.bytes_per_token, on_disk, rel_tol=1e-6) else (
        f"HarvestResult.bytes_per_token {t.last.bytes_per_token:.1f} != folder size / tokens {on_disk:.1f}")
    return Row("harvest", t.variant, statistics.median(t.rates), "tokens/s", t.rates, quality, {**t.config, **run},
               note=note)


def _saelens_work(model, tokens: np.ndarray, cfg: HarvestConfig, out: Path) -> Callable[[], tuple[int, float, Any]]:
    """SAELens 6.54.12's ``CacheActivationsRunner`` over the same rows, on our loaded model, fp32
    (:func:`saelens_cache`); the rate reported is ``runner.run()``'s, the product its settings."""
    def work() -> tuple[int, float, Any]:
        seconds, used = saelens_cache(model, tokens, out, hook=cfg.hook_names[0], model_name=cfg.model_name,
                                      dataset_path=str(cfg.dataset_path), batch_prompts=cfg.store_batch_size_prompts,
                                      device=cfg.device)
        return tokens.size, seconds, {**used, "output_path": str(out)}
    return work


def _saelens_row(t: _Timed, cfg: HarvestConfig, tokens: np.ndarray, run: dict) -> Row:
    quality = {"end_to_end_tokens_per_second": statistics.median(t.whole),
               "bytes_per_token": folder_bytes(t.last["output_path"]) / tokens.size}
    config = {**t.last, "version": importlib.metadata.version("sae-lens"), "model": cfg.model_name,
              "dataset_path": str(cfg.dataset_path), **run}
    return Row("harvest", "SAELens", statistics.median(t.rates), "tokens/s", t.rates, quality, config)


def saelens_cache(model, tokens: np.ndarray, out: Path, *, hook: str, model_name: str, dataset_path: str,
                  batch_prompts: int, device: str = "cpu") -> tuple[float, dict[str, Any]]:
    """Cache the activations of ``tokens`` ``[n_seqs, context_size]`` at ``hook`` with SAELens
    6.54.12's ``CacheActivationsRunner`` into ``out`` (emptied first), float32 and in row order.

    Its runner loads the model itself by name (TransformerLens ``HookedTransformer`` names only, and
    online), so its ``load_model`` is replaced by one that returns ``model``; everything else is its
    own code. The rows are its pre-tokenized ``input_ids`` dataset, passed as ``override_dataset``,
    in forward batches of ``batch_prompts`` rows (``n_seqs`` must be a multiple). The buffers are
    sized to cover the rows exactly: it writes whole buffers and silently wraps around the dataset
    to fill one (its default 2 GB buffer is 868K fp32 tokens of SmolLM2-135M). ``dataset_path`` and
    ``model_name`` are only recorded in its config; ``device`` is its ``device`` (``model`` must be there).

    Returns:
        ``(seconds of runner.run(): forward, shard writes, consolidation; the runner's settings)``.

    Raises:
        RuntimeError: SAELens stored other token rows than ``tokens``.
    """
    from datasets import Dataset
    from sae_lens.cache_activations_runner import CacheActivationsRunner
    from sae_lens.config import CacheActivationsRunnerConfig

    d_in = models.d_in_of(model, hook)
    bytes_per_token = d_in * 4
    n_batches = tokens.shape[0] // batch_prompts
    fewest = math.ceil(tokens.size * bytes_per_token / SAELENS_MAX_BUFFER_BYTES)
    n_buffers = next(k for k in range(fewest, n_batches + 1) if n_batches % k == 0)
    buffer_tokens = tokens.size // n_buffers
    settings = {"model_batch_size": batch_prompts, "context_size": tokens.shape[1], "hook_name": hook, "d_in": d_in,
                "training_tokens": tokens.size, "dtype": "float32", "device": device, "prepend_bos": False,
                "shuffle": False, "streaming": False,
                # half a token of slack: the runner floors buffer_size_gb * 1e9 / bytes_per_token
                "buffer_size_gb": (buffer_tokens + 0.5) * bytes_per_token / 1e9}
    shutil.rmtree(out, ignore_errors=True)  # it refuses a non-empty output folder
    runner_cfg = CacheActivationsRunnerConfig(dataset_path=dataset_path, model_name=model_name,
                                              new_cached_activations_path=str(out), **settings)
    dataset = Dataset.from_dict({"input_ids": tokens.tolist()})
    with mock.patch("sae_lens.cache_activations_runner.load_model", lambda **_: model), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns that 'samples' (rows) < training tokens
        runner = CacheActivationsRunner(runner_cfg, override_dataset=dataset)
        t0 = time.perf_counter()
        stored = runner.run()
        seconds = time.perf_counter() - t0
    if stored.num_rows != tokens.shape[0] or not np.array_equal(np.asarray(stored["token_ids"]), tokens):
        raise RuntimeError("SAELens stored other token rows than the benchmark's.")
    return seconds, {**settings, "n_buffers": n_buffers}


def _hooks_rows(cfg: HarvestConfig, model, tokens: np.ndarray, workdir: Path, run: dict) -> list[Row]:
    """Our fp32 harvest capturing 1 to 4 hooks of one block in a pass, the four taking turns; each
    row references ``1 hook`` (``paired_ratio``: the median of the per-round ratios)."""
    hook = cfg.hook_names[0]
    layer = models.hook_layer(hook)
    same_block = [f"blocks.{layer}.hook_{name}" for name in ("resid_pre", "resid_mid", "mlp_out", "resid_post")]
    hooks = [hook] + [h for h in same_block if h != hook][:3]
    models.validate_hook_names(model, hooks)
    variants = [_ours(f"{n} hook{'s' * (n > 1)}", dataclasses.replace(cfg, hook_names=hooks[:n]), model,
                      workdir / f"{n}") for n in range(1, len(hooks) + 1)]
    _rounds(variants, run)
    rows = []
    for t in variants:
        row = dataclasses.replace(_ours_row(t, tokens, run, forward=None), case="harvest_hooks")
        if t is not variants[0]:
            row.reference, row.quality["paired_ratio"] = "1 hook", paired_ratio(t.rates, variants[0].rates)
        rows.append(row)
    return rows


def compare_caches(reference: Path, other: Path, hook: str) -> dict[str, float]:
    """Per-token agreement of two caches of the same rows at ``hook``.

    Returns ``{"cosine_to_fp32": mean_t cos(x_t, y_t), "relative_error": mean_t ||y_t - x_t|| / ||x_t||}``
    with ``x`` the ``reference`` cache's activations and ``y`` the ``other``'s, both read as float32.
    """
    a, b = (ActivationCache.open(p) for p in (reference, other))
    x, y = (c.read_rows(hook, 0, c.layout.n_tokens).float() for c in (a, b))
    cosine = torch.nn.functional.cosine_similarity(x, y, dim=1)
    rel = (y - x).norm(dim=1) / x.norm(dim=1).clamp_min(1e-12)
    return {"cosine_to_fp32": cosine.mean().item(), "relative_error": rel.mean().item()}


def folder_bytes(path: Path) -> int:
    """Bytes of every file under ``path`` (what the folder costs on disk, before block rounding)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _settings(cfg: HarvestConfig) -> dict[str, Any]:
    keep = ("model_name", "hook_names", "dataset_path", "context_size", "n_tokens", "store_batch_size_prompts",
            "prepend_bos", "dtype", "model_dtype", "compression", "compression_level", "chunk_tokens",
            "chunks_per_shard", "holdout_tokens")
    return {k: getattr(cfg, k) for k in keep}


def print_rows(rows: list[Row], echo: Callable[[str], Any] = click.echo) -> None:
    """One line per row: case, variant, value and unit, ratio to its reference, quality figures."""
    for r in rows:
        ratio = f"  ×{r.ratio:.3f} vs {r.reference}" if r.ratio is not None else ""
        quality = "  " + ", ".join(f"{k} {v:.4g}" for k, v in r.quality.items()) if r.quality else ""
        note = f"  ({r.note})" if r.note else ""
        echo(f"{r.case:<15} {r.variant:<42} {r.value:>10.1f} {r.unit}{ratio}{quality}{note}")


@click.command()
@click.option("--quick", is_flag=True, help=f"Tiny run (sizes {QUICK}) to check the case works.")
@click.option("--n-tokens", default=32_768, show_default=True, type=int)
@click.option("--repeats", default=3, show_default=True, type=int)
@click.option("--workdir", default="data/bench/harvest_speed", show_default=True)
@click.option("--out", default=None, help="Also write the rows as JSON here.")
def main(quick: bool, n_tokens: int, repeats: int, workdir: str, out: str | None) -> None:
    sizes = QUICK if quick else {"n_tokens": n_tokens, "repeats": repeats}
    rows = harvest_rows(workdir=Path(workdir), **sizes)
    print_rows(rows)
    if out:
        Path(out).write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))


if __name__ == "__main__":
    main()
