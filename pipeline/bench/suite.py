"""The benchmark suite behind ``sae-pipeline bench``: every case side by side with SAELens, in one run.

Cases (``--cases``, comma-separated; all by default):

=============== =================================================================================
``train_topk``  TopK k 32, d_sae 4608, batch 4096 on real SmolLM2 activations: ours fp32, ours bf16
                (autocast), SAELens (:mod:`pipeline.bench.training_speed`)
``train_standard`` standard ReLU + L1, same data, d_sae 3072
``scaling``     our TopK tokens/s over d_sae 2304 → 9216 and k 16 → 128
``codecs``      codec × chunk shape candidates: bytes/token, decode and loader tokens/s
                (:mod:`pipeline.bench.codecs`)
``harvest``     forward-only vs our harvest vs SAELens's, bytes/token, bf16 compute and its cosine,
                hooks 1 → 4 (:mod:`pipeline.bench.harvest_speed`)
``memory``      peak resident memory of training on 200K- and 2M-token caches, and of harvests
                (:mod:`pipeline.bench.memory`)
``sweep``       8 TopK SAEs (k 16 → 128 × d_sae 2304, 4608) as one fused sweep, as 8 ``train`` runs
                in turn and as 8 SAELens runs from its own cache: wall time, held-out EV and L0
                per point, cache bytes read, peak memory, stacked encoder products
                (:mod:`pipeline.bench.sweep_speed`)
=============== =================================================================================

Writes ``bench.json`` (the machine, package versions, arguments, every row with its samples and
exact config, the goals of issues 4 and 6 with their measured values) and ``bench.md`` (the same as
tables) to ``--out``, and prints the tables. ``--quick`` runs every case at a tiny size to check the
machinery (its figures mean nothing). Ratios are what to compare: the machines are shared and noisy.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline.bench.measure import Row, add_ratios, machine
from pipeline.errors import ConfigError
from pipeline.sae.io import atomic_write


@dataclass
class Sizes:
    """How big each case runs (the full suite, or ``--quick``)."""

    steps: int = 200
    warmup_steps: int = 20
    block_steps: int = 30
    n_train_tokens: int = 65_536
    n_holdout_tokens: int = 8_192
    batch_size: int = 4096
    loader_batches: int = 400
    repeats: int = 3
    harvest_tokens: int = 16_384
    memory_sizes: tuple[int, ...] = (200_000, 2_000_000)
    memory_steps: int = 50
    memory_harvest_tokens: tuple[int, ...] = (8_192, 32_768)
    scaling_steps: int = 40
    d_saes: tuple[int, ...] = (2304, 4608, 9216)
    ks: tuple[int, ...] = (16, 32, 64, 128)
    sweep_tokens: int = 100_000
    sweep_d_saes: tuple[int, ...] = (2304, 4608)

    @classmethod
    def quick(cls) -> "Sizes":
        return cls(steps=6, warmup_steps=2, block_steps=2, n_train_tokens=1024, n_holdout_tokens=512,
                   batch_size=256, loader_batches=4, repeats=1, harvest_tokens=256,
                   memory_sizes=(8_192, 32_768), memory_steps=4, memory_harvest_tokens=(256, 512),
                   scaling_steps=6, d_saes=(256, 512), ks=(8, 16), sweep_tokens=1024, sweep_d_saes=(256,))


CASES = ("train_topk", "train_standard", "scaling", "codecs", "harvest", "memory", "sweep")


def parse_cases(text: str) -> list[str]:
    """``"train_topk,codecs"`` → the list in :data:`CASES` order, each once; ``all`` anywhere in it
    means every case.

    Raises:
        ConfigError: no case named, or an unknown case name (with the valid ones).
    """
    named = [c.strip() for c in text.split(",") if c.strip()]
    if not named:
        raise ConfigError(f"no bench case given in {text!r}; name some of: {', '.join(CASES)} (or all).")
    if "all" in named:
        return list(CASES)
    unknown = [c for c in named if c not in CASES]
    if unknown:
        raise ConfigError(f"unknown bench case(s) {unknown}; choose from: {', '.join(CASES)} (or all).")
    return [c for c in CASES if c in named]


def run_case(case: str, *, cache: str, workdir: Path, sizes: Sizes, device: str, saelens: bool) -> list[Row]:
    """The rows of one case (imports lazily: the harvest cases load a language model)."""
    from pipeline.bench import training_speed as ts

    def bench(name: str, **kw: Any) -> ts.StepBench:
        common = {"steps": sizes.steps, "warmup_steps": sizes.warmup_steps, "block_steps": sizes.block_steps,
                  "n_train_tokens": sizes.n_train_tokens, "n_holdout_tokens": sizes.n_holdout_tokens,
                  "batch_size": sizes.batch_size, "device": device}
        return ts.StepBench(name, **{**common, **kw})

    if case == "train_topk":
        benches = [bench(case, d_sae=sizes.d_saes[min(1, len(sizes.d_saes) - 1)])]
        if device.startswith("cuda"):  # the issue's GPU case: a 24,576-latent TopK
            benches.append(bench("train_topk_24576", d_sae=24_576))
        return ts.training_rows(cache, benches, saelens=saelens)
    if case == "train_standard":
        d_sae = 3072 if sizes.d_saes[-1] >= 3072 else sizes.d_saes[0]
        std = bench(case, architecture="standard", d_sae=d_sae, settings={"l1_coefficient": 5.0})
        return ts.training_rows(cache, [std], saelens=saelens, bf16=False)
    if case == "scaling":
        base = bench(case, d_sae=sizes.d_saes[0], steps=sizes.scaling_steps,
                     block_steps=max(1, (sizes.scaling_steps - sizes.warmup_steps) // 3))
        return ts.scaling_rows(cache, base, d_saes=sizes.d_saes, ks=sizes.ks)
    if case == "codecs":
        from pipeline.bench.codecs import codec_rows

        return codec_rows(cache, workdir / "codecs", batch_size=sizes.batch_size, n_batches=sizes.loader_batches,
                          repeats=sizes.repeats)
    if case == "harvest":
        from pipeline.bench.harvest_speed import harvest_rows

        return harvest_rows(n_tokens=sizes.harvest_tokens, repeats=sizes.repeats, workdir=workdir / "harvest",
                            device=device, saelens=saelens)
    if case == "sweep":
        from pipeline.bench.sweep_speed import SweepBench, sweep_rows

        return sweep_rows(SweepBench(cache=cache, tokens=sizes.sweep_tokens, ks=sizes.ks, d_saes=sizes.sweep_d_saes,
                                     batch_size=sizes.batch_size, device=device, saelens=saelens,
                                     stacking_repeats=sizes.repeats, workdir=workdir / "sweep"))
    from pipeline.bench.memory import memory_rows

    return memory_rows(source_cache=Path(cache), workdir=workdir / "memory", sizes=sizes.memory_sizes,
                       train_steps=sizes.memory_steps, harvest_tokens=sizes.memory_harvest_tokens)


# ------------------------------------------------------------------------------------- the goals
def _value(rows: list[Row], case: str, variant: str, key: str | None = None) -> float | None:
    for r in rows:
        if r.case == case and r.variant == variant:
            return r.value if key is None else r.quality.get(key)
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _diff(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


@dataclass
class Goal:
    """One goal of issue 4 or 6: ``measured`` compared with ``target`` (``>=`` or ``<=``)."""

    name: str
    measured: float | None
    op: str
    target: float | None  # None: set by what was run (the sweep's 1 / points) and nothing was

    @property
    def met(self) -> bool | None:
        if self.measured is None or self.target is None or math.isnan(self.measured):
            return None
        return self.measured >= self.target if self.op == ">=" else self.measured <= self.target


def goals(rows: list[Row]) -> list[Goal]:
    """The issues' goals that the measured rows decide (a case not run leaves its goals unmeasured)."""
    return _issue_6_goals(rows) + _sweep_goals(rows)


def _issue_6_goals(rows: list[Row]) -> list[Goal]:
    topk, std = "train_topk", "train_standard"
    trainers = [r.value for r in rows if r.case in (topk, std) and r.variant.startswith("ours")]
    loader = next((r for r in rows if r.case == "codecs"), None)
    harvest_ours = next((r for r in rows if r.case == "harvest" and r.variant.startswith("ours fp32")), None)
    mem = [r.ratio for r in rows if r.case == "memory_train" and r.ratio is not None]
    return [
        Goal("TopK fp32 tokens/s vs SAELens (paired blocks)", _speedup(rows, topk, "ours fp32"), ">=", 5.0),
        Goal("TopK fp32 held-out EV minus SAELens's", _diff(_value(rows, topk, "ours fp32", "explained_variance"),
                                                           _value(rows, topk, "SAELens", "explained_variance")),
             ">=", -0.005),
        Goal("standard tokens/s vs SAELens (paired blocks)", _speedup(rows, std, "ours fp32"), ">=", 1.5),
        Goal("standard held-out EV minus SAELens's", _diff(_value(rows, std, "ours fp32", "explained_variance"),
                                                          _value(rows, std, "SAELens", "explained_variance")),
             ">=", -0.005),
        Goal("loader tokens/s (default cache format)", loader.value if loader else None, ">=", 1e6),
        Goal("loader tokens/s / fastest trainer's", _ratio(loader.value if loader else None,
                                                           max(trainers) if trainers else None), ">=", 20.0),
        Goal("harvest tokens/s vs SAELens (paired runs)", _speedup(rows, "harvest", harvest_ours.variant)
             if harvest_ours else None, ">=", 1.0),
        Goal("harvest tokens/s / forward-only", harvest_ours.quality.get("fraction_of_forward") if harvest_ours
             else None, ">=", 0.9),
        Goal("harvest bytes/token vs SAELens (float16 storage)",
             harvest_ours.quality.get("bytes_per_token_vs_saelens") if harvest_ours else None, "<=", 0.5),
        Goal("training peak memory growth, largest vs smallest cache", max(mem) - 1 if mem else None, "<=", 0.10),
    ]


def _speedup(rows: list[Row], case: str, variant: str) -> float | None:
    """The row's ``paired_ratio`` (same-round blocks against its reference), else its ratio."""
    row = next((r for r in rows if r.case == case and r.variant == variant), None)
    return None if row is None else row.quality.get("paired_ratio", row.ratio)


def _sweep_goals(rows: list[Row]) -> list[Goal]:
    """Issue 4: the fused sweep faster than our runs in turn and 3× SAELens's; a batch read once for
    the group (activation bytes fused / all sequential runs = 1 / points); the group within its
    memory estimate (peak growth over the estimate of ``pipeline.sweep.group_memory_bytes``)."""
    fused = _value(rows, "sweep", "fused sweep")
    n_points = sum(r.case == "sweep_points" and r.variant.startswith("fused sweep: ") for r in rows)
    return [
        Goal("sweep: sequential train seconds / fused sweep seconds", _ratio(_value(rows, "sweep", "sequential train"),
                                                                          fused), ">=", 1.0),
        Goal("sweep: SAELens sequential seconds / fused sweep seconds",
             _ratio(_value(rows, "sweep", "SAELens sequential"), fused), ">=", 3.0),
        Goal("sweep: cache bytes read, fused / sequential runs",
             _value(rows, "sweep_cache_reads", "fused sweep", "activation_bytes_vs_sequential"), "<=",
             1 / n_points if n_points else None),
        Goal("sweep: fused group peak memory growth / estimate",
             _value(rows, "sweep_memory", "fused group", "growth_over_estimate"), "<=", 1.0),
    ]


# ---------------------------------------------------------------------------------------- output
def _fmt(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "**no**"
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"
    return str(x)


def markdown(result: dict[str, Any]) -> str:
    """``bench.md``: the machine, one table per case, then the goals."""
    m = result["machine"]
    lines = [f"# sae-pipeline bench ({result['finished']})", "",
             f"{m['cpu']}, {m['cpu_count']} cores, torch threads {m['torch_threads']}, {m['memory_gib']} GiB, "
             f"device {result['args']['device']}; load average at start "
             + " / ".join(f"{x:.2f}" for x in m["load_average_at_start"]) + "; "
             + ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v), "",
             _run_line(result["args"]), ""]
    if result["errors"]:
        lines += ["**Failed cases** (their goals stay unmeasured):", "",
                  *(f"- `{case}`: {err}" for case, err in result["errors"].items()), ""]
    for case in dict.fromkeys(r["case"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["case"] == case]
        keys = list(dict.fromkeys(k for r in rows for k in r["quality"]))
        lines += [f"## {case}", "", "| variant | value | unit | ratio | vs | " + " | ".join(keys) + " | note |",
                  "| --- | ---: | --- | ---: | --- | " + " | ".join("---:" for _ in keys) + " | --- |"]
        for r in rows:
            cells = [r["variant"], _fmt(r["value"]), r["unit"], _fmt(r["ratio"]), r["reference"] or "",
                     *(_fmt(r["quality"].get(k)) for k in keys), r["note"]]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## goals (issues 4 and 6)", "", "| goal | measured | target | met |", "| --- | ---: | --- | --- |"]
    for g in result["goals"]:
        lines.append(f"| {g['name']} | {_fmt(g['measured'])} | {g['op']} {_fmt(g['target'])} | {_fmt(g['met'])} |")
    return "\n".join(lines) + "\n"


def _run_line(args: dict[str, Any]) -> str:
    """What was run: the cases, the cache, and whether the sizes were ``--quick``'s."""
    line = f"Cases {', '.join(args['cases'])}; cache `{args['cache']}`" + ("" if args["saelens"] else "; no SAELens")
    return line + (". **`--quick` sizes: the figures check the machinery and mean nothing.**" if args["quick"] else ".")


def run_suite(cases: list[str], *, cache: str, out: Path, device: str = "cpu", quick: bool = False,
              saelens: bool = True, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``cases`` and write ``out/bench.json`` and ``out/bench.md``; returns the JSON's dict.

    A case that raises is recorded (``errors``) and the others still run; both files are rewritten
    after every case, so an interrupted run keeps the figures of the cases it finished.
    """
    sizes = Sizes.quick() if quick else Sizes()
    out.mkdir(parents=True, exist_ok=True)
    result = new_result({"cases": cases, "cache": cache, "device": device, "quick": quick, "saelens": saelens,
                         "sizes": asdict(sizes)})
    rows: list[Row] = []
    for case in cases:
        echo(f"bench: {case} ...")
        t0 = time.perf_counter()
        try:
            rows += run_case(case, cache=cache, workdir=out / "work", sizes=sizes, device=device, saelens=saelens)
        except Exception as err:  # noqa: BLE001 - one broken case must not lose the others' figures
            result["errors"][case] = f"{type(err).__name__}: {err}"
            echo(f"bench: {case} failed: {result['errors'][case]}")
        echo(f"bench: {case} took {time.perf_counter() - t0:.0f} s")
        save_result(result, add_ratios(rows), out / "bench.json")
    echo(markdown(result))
    return result


def new_result(args: dict[str, Any]) -> dict[str, Any]:
    """The JSON of a run before its rows: start time, the machine (:func:`machine`), ``args``
    (``args["device"]`` is printed by :func:`markdown`)."""
    return {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "finished": None, "machine": machine(), "args": args,
            "rows": [], "goals": [], "errors": {}}


def save_result(result: dict[str, Any], rows: list[Row], json_path: Path) -> None:
    """Fill ``result`` with ``rows`` and their goals; write it to ``json_path`` and as Markdown
    (:func:`markdown`) beside it (``.md``), each atomically."""
    result.update(finished=time.strftime("%Y-%m-%d %H:%M:%S"), rows=[asdict(r) for r in rows],
                  goals=[{**asdict(g), "met": g.met} for g in goals(rows)])
    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(json_path, lambda p: p.write_text(json.dumps(result, indent=2, default=str)))
    atomic_write(json_path.with_suffix(".md"), lambda p: p.write_text(markdown(result)))
