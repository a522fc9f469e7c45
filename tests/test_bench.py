"""The benchmark suite's machinery (``sae-pipeline bench``), on real SmolLM2 activations.

No timing is asserted: these check that the suite measures what it says (the rewritten caches hold
the same rows, quality figures equal an independent computation, goals compare the right rows).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.bench import codecs, suite, sweep_speed, training_speed
from pipeline.bench.measure import Row, add_ratios, interleaved_calls, median_rate
from pipeline.cache import ActivationCache, array_key
from pipeline.errors import ConfigError

pytestmark = pytest.mark.slow  # the real_cache fixture harvests SmolLM2-135M


def test_a_rewritten_cache_holds_the_same_rows_tokens_and_holdout(real_cache, tmp_path):
    hook = real_cache.hook_names[0]
    copy, _ = codecs.rewrite_cache(real_cache, tmp_path / "c", "zstd", 8192, 2)
    assert copy.layout.chunk_tokens == 8192 and copy.attrs["compression"] == "zstd"
    np.testing.assert_array_equal(copy.array(hook)[:], real_cache.array(hook)[:])
    np.testing.assert_array_equal(copy.tokens[:], real_cache.tokens[:])
    holdout = lambda c: c.layout.chunk_rows(c.holdout_chunks[0])[0]  # noqa: E731
    assert holdout(copy) == holdout(real_cache)  # same held-out tokens, in bigger chunks
    assert copy.statistics(hook) == real_cache.statistics(hook)


def test_codec_rows_report_sizes_that_match_the_files(real_cache, tmp_path):
    rows = codecs.codec_rows(real_cache.path, tmp_path, candidates=[("none", 4096, 8), ("zstd", 4096, 8)],
                             batch_size=512, n_batches=3, repeats=1)
    none, zstd = rows
    d_in = real_cache.d_in_of(real_cache.hook_names[0])
    # "none" stores float16 rows as they are: 2 bytes per value, plus token ids and metadata
    assert none.quality["compression_ratio"] == pytest.approx(1.0, abs=0.01)
    assert 2 * d_in <= none.quality["bytes_per_token"] < 2 * d_in + 16
    # Zstd finds the redundancy of float16 exponent bytes (measured ~7% on these activations)
    assert 1.03 < zstd.quality["compression_ratio"] < 1.3
    assert zstd.quality["bytes_per_token"] < none.quality["bytes_per_token"]
    assert none.ratio is None and zstd.reference == none.variant
    assert all(r.value > 0 and r.quality["decode_tokens_per_second"] > 0 for r in rows)
    assert not list(tmp_path.iterdir())  # the rewritten caches are removed after measuring


def test_interleaved_rates_warm_up_untimed_then_take_turns_block_by_block():
    bench = training_speed.StepBench("t", steps=11, warmup_steps=3, block_steps=4, batch_size=2)
    data = training_speed.Data(None, "h", torch.arange(6.0)[:, None].repeat(1, 3), torch.zeros(2, 3), 1.0)
    calls = []
    variants = [training_speed.Variant(name, lambda x, name=name: calls.append((name, int(x[0, 0]))), dict)
                for name in ("a", "b")]
    rates = training_speed.interleaved_rates(variants, data, bench)
    assert {k: len(v) for k, v in rates.items()} == {"a": 2, "b": 2}  # steps 4-7 and 8-11 are the timed blocks
    firsts = [0, 2, 4, 0, 2, 4]  # the first row of each of the 3 cycled batches of 2 rows
    a_then_b = [("a", r) for r in firsts[:3]] + [("b", r) for r in firsts[:3]]  # the warm-up
    for block in range(2):
        steps = [firsts[i % 3] for i in range(3 + 4 * block, 7 + 4 * block)]
        a_then_b += [("a", r) for r in steps] + [("b", r) for r in steps]
    assert calls == a_then_b  # the same batches, in turn
    with pytest.raises(ValueError, match="raise steps"):
        training_speed.interleaved_rates(variants, data, training_speed.StepBench("t", steps=4, warmup_steps=3,
                                                                                  block_steps=4, batch_size=2))


def test_held_out_quality_is_the_evaluate_stage_definition():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=gen) + 3.0
    noise = 0.3 * torch.randn(300, 8, generator=gen)
    acts = torch.relu(torch.randn(300, 5, generator=gen))
    q = training_speed.held_out_quality(lambda b: acts, lambda f: x + noise, x, d_sae=5, batch_size=300)
    ev = 1 - (noise ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert q["explained_variance"] == pytest.approx(float(ev), rel=1e-5)
    assert q["l0"] == pytest.approx(float((acts > 0).sum(1).float().mean()), rel=1e-6)


def test_ours_fp32_bf16_and_saelens_train_the_same_topk_on_real_rows(real_cache):
    bench = training_speed.StepBench("train_topk", d_sae=512, settings={"k": 8}, batch_size=512, lr=2e-3,
                                     n_train_tokens=4096, n_holdout_tokens=2048, steps=40, warmup_steps=4,
                                     block_steps=12)
    rows = training_speed.training_rows(str(real_cache.path), [bench])
    ours, bf16, saelens = rows
    assert [r.variant for r in rows] == ["ours fp32", "ours bf16", "SAELens"]
    for r in rows:
        assert r.quality["l0"] == pytest.approx(8.0, abs=0.05)  # TopK: exactly k active per token
        assert 0.4 < r.quality["explained_variance"] < 1.0, r  # learnt from the real rows
        assert len(r.samples) == 3
    # bf16 matmuls change selection at the margin only: quality within 0.02 of fp32
    assert abs(bf16.quality["explained_variance"] - ours.quality["explained_variance"]) < 0.02
    assert ours.reference == "SAELens" and ours.config["d_in"] == real_cache.d_in_of(real_cache.hook_names[0])


def test_goals_compare_the_right_rows():
    rows = add_ratios([
        Row("train_topk", "ours fp32", 30_000.0, "tokens/s", quality={"explained_variance": 0.80}, reference="SAELens"),
        Row("train_topk", "SAELens", 5_000.0, "tokens/s", quality={"explained_variance": 0.81}),
        Row("codecs", "lz4, chunk 4096, 8/shard", 900_000.0, "tokens/s"),
        Row("memory_train", "200000 tokens", 1000.0, "MiB"),
        Row("memory_train", "2000000 tokens", 1050.0, "MiB", reference="200000 tokens"),
    ])
    by_name = {g.name: g for g in suite.goals(rows)}
    assert by_name["TopK fp32 tokens/s vs SAELens (paired blocks)"].measured == pytest.approx(6.0)
    assert by_name["TopK fp32 tokens/s vs SAELens (paired blocks)"].met is True
    assert by_name["TopK fp32 held-out EV minus SAELens's"].measured == pytest.approx(-0.01)
    assert by_name["TopK fp32 held-out EV minus SAELens's"].met is False
    assert by_name["loader tokens/s / fastest trainer's"].measured == pytest.approx(30.0)
    assert by_name["loader tokens/s (default cache format)"].met is False
    assert by_name["training peak memory growth, largest vs smallest cache"].measured == pytest.approx(0.05)
    assert by_name["standard tokens/s vs SAELens (paired blocks)"].met is None  # not run: unmeasured, not failed
    # a row measured in rounds with its reference is judged on the median of the per-round ratios
    paired = add_ratios([
        Row("train_standard", "ours fp32", 9_000.0, "tokens/s", quality={"paired_ratio": 1.6}, reference="SAELens"),
        Row("train_standard", "SAELens", 6_400.0, "tokens/s"),
    ])
    goal = {g.name: g for g in suite.goals(paired)}["standard tokens/s vs SAELens (paired blocks)"]
    assert paired[0].ratio == pytest.approx(9_000 / 6_400) and goal.measured == 1.6 and goal.met is True


def test_median_rate_warms_up_then_takes_the_median():
    calls = []

    def run():
        calls.append(1)
        return 10
    median, rates = median_rate(run, repeats=3, warmup=2)
    assert len(calls) == 5 and len(rates) == 3 and median == sorted(rates)[1]


def test_interleaved_calls_warm_each_up_then_take_turns():
    calls = []

    def runner(name, units):
        def run():
            calls.append(name)
            return units
        return run
    rates = interleaved_calls({"a": runner("a", 10), "b": runner("b", 20)}, repeats=3, warmup=1)
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert [len(r) for r in rates.values()] == [3, 3] and all(r > 0 for r in rates["a"] + rates["b"])


def test_the_suite_writes_json_and_markdown_and_keeps_going_past_a_failed_case(real_cache, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("boom")
    monkeypatch.setattr(codecs, "codec_rows", broken)
    result = suite.run_suite(["scaling", "codecs"], cache=str(real_cache.path), out=tmp_path, quick=True,
                             echo=lambda s: None)
    def strict(constant):
        raise ValueError(f"bench.json holds {constant}, which is not JSON")
    saved = json.loads((tmp_path / "bench.json").read_text(), parse_constant=strict)
    assert saved["errors"] == {"codecs": "RuntimeError: boom"} == result["errors"]
    sweep_bytes = next(g for g in saved["goals"] if g["name"].startswith("sweep: cache bytes"))
    assert sweep_bytes["target"] is None and sweep_bytes["met"] is None  # no sweep ran: no 1 / points
    variants = [r["variant"] for r in saved["rows"]]
    assert variants == ["d_sae 256", "d_sae 512", "k 8", "k 16"]
    assert saved["machine"]["packages"]["torch"] == torch.__version__ and saved["args"]["quick"] is True
    md = (tmp_path / "bench.md").read_text()
    assert "## scaling_d_sae" in md and "## scaling_k" in md and "## goals (issues 4 and 6)" in md
    assert "- `codecs`: RuntimeError: boom" in md and "Cases scaling, codecs;" in md and "`--quick` sizes" in md


def test_unknown_cases_are_refused_with_the_valid_names():
    with pytest.raises(ConfigError, match="train_topk.*codecs"):
        suite.parse_cases("train_topk,codec")
    for empty in ("", " , "):
        with pytest.raises(ConfigError, match="no bench case given"):
            suite.parse_cases(empty)
    assert suite.parse_cases("all") == list(suite.CASES) == suite.parse_cases("harvest,all")
    assert suite.parse_cases("sweep,harvest,sweep") == ["harvest", "sweep"]  # each once, in suite order


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "device 'tpu' is not a torch device"),
    (["--cases", "codecs", "--cache", "{tmp}/none"], "no activation cache at '.*none', which the codecs case"),
])
def test_the_bench_command_refuses_a_bad_device_or_a_missing_cache_before_running_anything(tmp_path, capsys, args,
                                                                                           message):
    import re

    from stages.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--out", str(tmp_path / "out"), *[a.format(tmp=tmp_path) for a in args]])
    assert exit_info.value.code == 2 and not (tmp_path / "out").exists()
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("args, message", [
    (["--tokens", "0"], "Invalid value for '--tokens': 0 is not in the range x>=1"),
    (["--ks", "16,a"], "Invalid value for '--ks': expected comma-separated positive integers"),
    (["--d-saes", "0"], "Invalid value for '--d-saes': expected comma-separated positive integers"),
    ([], "Error: no activation cache at '.*': run `sae-pipeline harvest` first"),  # an empty folder
])
def test_the_sweep_speed_cli_refuses_bad_values_in_one_line_naming_the_option(tmp_path, args, message):
    import re

    from click.testing import CliRunner

    result = CliRunner().invoke(sweep_speed.main, ["--cache", str(tmp_path), "--workdir", str(tmp_path / "w"),
                                                   "--out", str(tmp_path / "o.json"), "--no-saelens", *args])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output  # not a traceback
    assert re.search(message, result.output), result.output


def test_the_sweep_benchmarks_explain_themselves_in_their_help():
    from click.testing import CliRunner

    from pipeline.bench import sweep_memory

    speed = CliRunner().invoke(sweep_speed.main, ["-h"])
    assert speed.exit_code == 0 and "Time a TopK sweep" in speed.output and "TopK k values" in speed.output
    memory = CliRunner().invoke(sweep_memory.main, ["-h"])
    assert memory.exit_code == 0 and "resident memory" in memory.output and "RELIABILITY.md" in memory.output


def test_the_counting_store_counts_a_chunks_compressed_bytes_and_its_shard_index(real_cache):
    hook, lay = real_cache.hook_names[0], real_cache.layout
    shard_file = real_cache.path / array_key(hook) / "c" / "1" / "0"
    # the sharding codec's index, read here from the file itself: (offset, nbytes) per chunk, then a CRC-32C
    index_bytes = 16 * lay.chunks_per_shard + 4
    raw = shard_file.read_bytes()[-index_bytes:]
    nbytes = np.frombuffer(raw[:-4], dtype="<u8").reshape(-1, 2)[:, 1]
    with sweep_speed.counting_cache_reads() as counts:
        cache = ActivationCache.open(real_cache.path)
        cache.read_chunk(hook, lay.chunks_per_shard + 1)  # the second chunk of shard 1
    assert counts[f"{array_key(hook)}/c"] == nbytes[1] + index_bytes


def test_sweep_speed_trains_every_point_alike_and_reads_the_cache_once_for_the_group(real_cache, smollm2, tmp_path):
    bench = sweep_speed.SweepBench(cache=str(real_cache.path), tokens=2000, ks=(8, 16), d_saes=(256,), batch_size=512,
                                   stacking_repeats=1, workdir=tmp_path)
    rows = sweep_speed.sweep_rows(bench, model=smollm2)
    by = {(r.case, r.variant): r for r in rows}
    methods = ["fused sweep", "sequential train", "SAELens sequential"]
    assert [r.variant for r in rows if r.case == "sweep"] == methods
    points = [r for r in rows if r.case == "sweep_points"]
    assert len(points) == 6 and {r.quality["tokens"] for r in points} == {4 * 512}  # ceil(2000 / 512) batches each
    fused = [r for r in points if r.variant.startswith("fused")]
    sequential = [r for r in points if r.variant.startswith("sequential")]
    for f, s in zip(fused, sequential):
        assert f.quality["weights_identical_to_sequential"] == 1.0  # a group member ends as its single run
        assert f.value == s.value and f.quality["l0"] == s.quality["l0"]
    for r in points:  # TopK keeps k latents per token (ReLU may drop a negative one) and learnt something
        assert 0.9 * r.config["k"] <= r.quality["l0"] <= r.config["k"] and 0 < r.value < 1, r
    assert by[("sweep", "sequential train")].value == pytest.approx(sum(by[("sweep", "sequential train")].samples))
    assert by[("sweep", "fused sweep")].reference == "sequential train"
    # one pass of the loader serves the group: it reads what each single run reads, once
    fused_reads = by[("sweep_cache_reads", "fused sweep")]
    sequential_reads = by[("sweep_cache_reads", "sequential train")]
    assert fused_reads.samples[0] == sequential_reads.samples[0] == sequential_reads.samples[1] > 0
    assert fused_reads.quality["activation_bytes_vs_sequential"] == 0.5
    assert fused_reads.value == pytest.approx(fused_reads.samples[0] / (2 * 4 * 512))
    goal = {g.name: g for g in suite.goals(rows)}["sweep: cache bytes read, fused / sequential runs"]
    assert goal.target == 0.5 and goal.met is True
    memory = by[("sweep_memory", "fused group")]
    assert memory.reference == "one SAE alone" and memory.quality["estimate_mib"] > 0
    stacking = [r for r in rows if r.case == "sweep_stacking"]
    assert [r.variant for r in stacking] == ["separate, d_sae 256", "concatenated, d_sae 256", "bmm, d_sae 256"]
    assert all(r.value > 0 for r in stacking) and stacking[1].ratio is not None
