"""pipeline.analysis on a real SAE: a TopK SAE (d_sae 256, k 16) trained for 40 steps on SmolLM2-135M
``blocks.8.hook_resid_post`` activations of WikiText-2 (the session ``real_cache``). Every figure is
checked against an independent computation: the SAE's formula written out, a brute-force scan of
the whole cache, the model's own logits and hand-computed cross-entropy, the next hook's activation.
The dashboard is opened in headless Chromium (Debian ``chromium``; CI installs it, see README).
"""

from __future__ import annotations

import dataclasses
import html
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline import models
from pipeline.analysis.attribution import logit_attribution, token_effects
from pipeline.analysis.dashboard import build_dashboard, write_dashboard
from pipeline.analysis.features import format_feature_table, max_activation_over_texts, read_features
from pipeline.analysis.matching import check_sae_fits_model
from pipeline.analysis.max_activating import firing_frequencies, max_activating_examples
from pipeline.analysis.neuronpedia import IDS_FILENAME, neuronpedia_url, neuronpedia_url_for
from pipeline.analysis.splice import splice_sae
from pipeline.analysis.steering import steer, steered_generation
from pipeline.config import EvalConfig, TrainConfig
from pipeline.errors import ConfigError
from pipeline.evaluate import evaluate
from pipeline.sae import SAE, SAEConfig, get_architecture
from pipeline.sae.pretrained import list_sae_ids
from pipeline.training import train
from stages.cli import cli

pytestmark = pytest.mark.slow

HOOK = "blocks.8.hook_resid_post"
NEXT_HOOK = "blocks.9.hook_resid_pre"  # the same residual stream, read after the spliced hook
TEXT = "The Eiffel Tower is in Paris, the capital of France."
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0"]


@pytest.fixture(scope="module")
def sae_path(real_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("analysis") / "sae"
    train(TrainConfig(cache_path=str(real_cache.path), architecture="topk", k=16, d_sae=256, lr=1e-3,
                      train_batch_size_tokens=1024, training_tokens=40 * 1024, output_path=str(out), seed=0),
          progress=False)
    return out


@pytest.fixture(scope="module")
def sae(sae_path) -> SAE:
    return SAE.load(sae_path)


@pytest.fixture(scope="module")
def active(smollm2, sae) -> list[int]:
    """Three distinct latents that are the top latent of some token of TEXT (so they are alive)."""
    top = read_features(smollm2, sae, TEXT).top_features(1)[1][:, 0].tolist()
    return list(dict.fromkeys(top))[:3]


@torch.no_grad()
def _topk_encode(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """The TopK SAE's latents written out (Gao et al. 2024): ReLU of the k largest of (x - b_dec) W_enc + b_enc."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    values, indices = pre.topk(sae.cfg.k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values.clamp_min(0))


def _hook_acts(model, tokens: torch.Tensor, hook: str = HOOK) -> torch.Tensor:
    with torch.no_grad():
        return model.run_with_cache(tokens, names_filter=[hook])[1][hook]


# --------------------------------------------------------------------------- matching


def test_an_sae_of_another_width_hook_or_model_is_refused_with_the_fix(smollm2, sae):
    wide = get_architecture("standard")(SAEConfig("standard", d_in=768, d_sae=32, hook_name=HOOK))
    with pytest.raises(ConfigError, match=r"d_in 768 but the model's 'blocks.8.hook_resid_post' is 576 wide"):
        read_features(smollm2, wide, TEXT)
    typo = get_architecture("standard")(SAEConfig("standard", d_in=576, d_sae=32, hook_name="blocks.8.hook_resid_pots"))
    with pytest.raises(ConfigError, match=r"(?s)does not have.*closest valid names: \[.blocks.8.hook_resid_post."):
        check_sae_fits_model(typo, smollm2)
    with pytest.raises(ConfigError, match=r"trained on model 'smollm2-135m' but the model given is 'gpt2'.*--model smollm2-135m"):
        check_sae_fits_model(sae, smollm2, model_name="gpt2")
    assert check_sae_fits_model(sae, smollm2, model_name="SmolLM2-135M") == HOOK


# --------------------------------------------------------------------------- workflow 1


def test_top_features_per_token_match_the_sae_formula(smollm2, sae):
    tf = read_features(smollm2, sae, TEXT)
    ids = smollm2.tokenizer(TEXT, add_special_tokens=False)["input_ids"]  # trained without BOS
    assert tf.tokens.tolist() == ids
    assert tf.str_tokens == [smollm2.tokenizer.decode([i]) for i in ids]
    x = _hook_acts(smollm2, torch.tensor([ids]))[0]  # the full forward pass, not stopped after block 8
    f = _topk_encode(sae, x)
    torch.testing.assert_close(tf.feature_acts, f, atol=1e-4, rtol=1e-4)
    values, indices = tf.top_features(3)
    order = np.argsort(-f.numpy(), axis=1, kind="stable")[:, :3]
    assert (indices.numpy() == order).all()
    assert tf.n_active.tolist() == (f > 0).sum(1).tolist() and tf.n_active.max() <= 16

    x_hat = f @ sae.W_dec + sae.b_dec
    err = (x - x_hat).pow(2).sum(1)
    torch.testing.assert_close(tf.mse, err / 576, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(tf.cosine, (x * x_hat).sum(1) / (x.norm(dim=1) * x_hat.norm(dim=1)), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(tf.explained_variance, 1 - err / (x - x.mean(0)).pow(2).sum(1), rtol=1e-3, atol=1e-4)
    assert tf.cosine.mean() > 0.8  # a trained SAE, not noise

    table = format_feature_table(tf, k=3)
    row = table.splitlines()[1 + 6]  # ' Paris'
    assert "' Paris'" in row and f"{int(indices[6, 0])}:{float(values[6, 0]):.2f}" in row


def test_max_activation_over_texts_ranks_the_texts_that_carry_a_latent(smollm2, sae):
    f = int(read_features(smollm2, sae, TEXT).top_features(1)[1][6, 0])  # top latent on ' Paris'
    texts = ["It rained all day.", TEXT, "Numbers: 1 2 3 4"]
    result = max_activation_over_texts(smollm2, sae, texts, [f])
    expected = []
    for i, text in enumerate(texts):
        tokens = smollm2.to_tokens(text, prepend_bos=False)
        acts = _topk_encode(sae, _hook_acts(smollm2, tokens)[0])[:, f]
        expected.append(float(acts.max()))
        assert float(result.values[i, 0]) == pytest.approx(expected[-1], abs=1e-4)
        assert result.tokens[i][0] == smollm2.tokenizer.decode([int(tokens[0, int(acts.argmax())])])
    assert result.ranking(f) == np.argsort(-np.array(expected), kind="stable").tolist()
    assert expected[1] > 0


# --------------------------------------------------------------------------- max-activating examples


def test_max_activating_examples_equal_a_brute_force_scan_of_the_cache(real_cache, sae):
    ctx = real_cache.layout.context_size
    x = torch.from_numpy(np.asarray(real_cache.array(HOOK)[:])).float()  # the whole cache at once
    token_ids = np.asarray(real_cache.tokens[:]).reshape(-1)
    the = int(np.bincount(token_ids).argmax())  # the most common token, left out to exercise the exclusion
    keep = token_ids != the
    latents = _topk_encode(sae, x).numpy()
    frequency = ((latents > 0) & keep[:, None]).sum(0) / keep.sum()
    np.testing.assert_allclose(firing_frequencies(real_cache, sae, exclude_token_ids=[the], batch_size=1000,
                                                  progress=False), frequency)

    by_frequency = np.argsort(-frequency, kind="stable")
    features = [int(by_frequency[0]), int(by_frequency[40]), int(by_frequency[-1])]
    stats = max_activating_examples(real_cache, sae, features, n_examples=5, window=(3, 2), n_bins=16,
                                    exclude_token_ids=[the], batch_size=1000, progress=False)
    for f in features:
        column = np.where(keep, latents[:, f], -np.inf)
        top_rows = np.argsort(-column, kind="stable")[:5]
        top_rows = top_rows[column[top_rows] > 0]
        s = stats[f]
        assert s.n_tokens == keep.sum() and s.n_firing == ((column > 0)).sum()
        assert s.frequency == pytest.approx(frequency[f])
        assert [ex.seq * ctx + ex.pos for ex in s.examples] == top_rows.tolist()
        for ex, row in zip(s.examples, top_rows):
            assert ex.activation == pytest.approx(column[row], abs=1e-4)
            seq, pos = divmod(int(row), ctx)
            lo, hi = max(0, pos - 3), min(ctx, pos + 3)
            assert ex.window_start == lo and ex.token_ids == real_cache.tokens[seq, lo:hi].tolist()
            np.testing.assert_allclose(ex.acts, np.where(keep[seq * ctx + lo: seq * ctx + hi],
                                                         latents[seq * ctx + lo: seq * ctx + hi, f], 0), atol=1e-4)
        firing = column[column > 0]
        if firing.size == 0:  # a dead latent: nothing to show, nothing counted
            assert s.examples == [] and s.histogram.sum() == 0 and s.max_activation == 0
            continue
        np.testing.assert_array_equal(s.histogram, np.histogram(firing, bins=s.bin_edges)[0])
        assert firing.max() < s.bin_edges[-1] <= 2 * firing.max() and s.max_activation == pytest.approx(firing.max())


# --------------------------------------------------------------------------- logit attribution


def test_attribution_terms_sum_to_the_direct_logit_difference(smollm2, sae):
    prompt, target, baseline = "The Eiffel Tower is in the city of", " Paris", " London"
    a = logit_attribution(smollm2, sae, prompt, target, baseline=baseline)
    tokens = smollm2.to_tokens(prompt, prepend_bos=False)
    t, b = (smollm2.to_tokens(s, prepend_bos=False)[0, 0] for s in (target, baseline))
    with torch.no_grad():
        logits, cache = smollm2.run_with_cache(tokens, names_filter=[HOOK, "ln_final.hook_scale"])
    w = smollm2.ln_final._original_component.weight  # SmolLM2's final RMSNorm, weight only
    u = smollm2.W_U[:, t] - smollm2.W_U[:, b]
    s = cache["ln_final.hook_scale"][0, -1, 0]
    x = cache[HOOK][0, -1]
    direct = float(((x / s) * w) @ u)  # b_U is 0 for SmolLM2 (tied embeddings)
    assert a.total == pytest.approx(direct, rel=1e-4, abs=1e-4)
    assert float(a.contributions.sum()) + a.error + a.bias == pytest.approx(a.total, abs=1e-9)
    assert a.model_logit == pytest.approx(float(logits[0, -1, t] - logits[0, -1, b]), abs=1e-4)
    f = _topk_encode(sae, x)
    feature, act, contribution = a.top(1)[0]
    assert act == pytest.approx(float(f[feature]), abs=1e-4)
    W_dec, b_dec = sae.W_dec.detach(), sae.b_dec.detach()
    assert contribution == pytest.approx(float(f[feature] * ((W_dec[feature] / s) * w) @ u), rel=1e-3, abs=1e-5)
    assert a.error == pytest.approx(float(((x - (f @ W_dec + b_dec)) / s * w) @ u), rel=1e-3, abs=1e-4)

    # On the final residual stream the direct path is the whole logit difference. The SAE is reused
    # there (same width): the decomposition is exact whatever the SAE, its error term takes the rest.
    final = _reload(sae)
    final.cfg = dataclasses.replace(final.cfg, hook_name="blocks.29.hook_resid_post")
    at_end = logit_attribution(smollm2, final, prompt, target, baseline=baseline)
    assert at_end.total == pytest.approx(a.model_logit, rel=1e-4, abs=1e-3)


def _reload(sae: SAE) -> SAE:
    clone = type(sae)(dataclasses.replace(sae.cfg))
    clone.load_state_dict(sae.state_dict())
    return clone


@pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning")
def test_attribution_through_a_layernorm_equals_the_model_logit():
    """A tiny HookedTransformer with a final LayerNorm (weight and bias, centring): the other branch."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=16, d_head=4, n_heads=4, n_ctx=12, d_vocab=50,
                                  act_fn="relu", normalization_type="LN", seed=0)
    model = HookedTransformer(cfg).eval()
    with torch.no_grad():
        model.ln_final.w.uniform_(0.5, 1.5)
        model.ln_final.b.normal_()
        model.unembed.b_U.normal_()
    sae = get_architecture("standard")(SAEConfig("standard", d_in=16, d_sae=40, hook_name="blocks.1.hook_resid_post"))
    model.to_tokens = lambda text, prepend_bos=False: torch.tensor([[3, 7, 11, 5]])
    a = logit_attribution(model, sae, "ignored", 9, baseline=4)
    with torch.no_grad():
        logits = model(torch.tensor([[3, 7, 11, 5]]))[0, -1]
    assert a.total == pytest.approx(float(logits[9] - logits[4]), rel=1e-5, abs=1e-5)


def test_token_effects_are_the_decoder_rows_through_the_unembedding(smollm2, sae):
    feature = 7
    effects = token_effects(smollm2, sae, [feature], n=5)[feature]
    weights = (sae.W_dec[feature] * smollm2.ln_final._original_component.weight) @ smollm2.W_U
    top, bottom = weights.topk(5), weights.topk(5, largest=False)
    assert [tok for tok, _ in effects.promoted] == [smollm2.tokenizer.decode([int(i)]) for i in top.indices]
    assert [tok for tok, _ in effects.suppressed] == [smollm2.tokenizer.decode([int(i)]) for i in bottom.indices]
    assert effects.promoted[0][1] == pytest.approx(float(top.values[0]), rel=1e-4)


# --------------------------------------------------------------------------- splicing


def _holdout_tokens(real_cache, n: int) -> torch.Tensor:
    first = real_cache.holdout_chunks[0] * (real_cache.layout.chunk_tokens // real_cache.layout.context_size)
    return torch.from_numpy(np.asarray(real_cache.tokens[first:first + n]).astype(np.int64))


def test_splice_with_error_term_keeps_logits_exposes_latents_and_removes_itself(smollm2, sae, real_cache):
    tokens = _holdout_tokens(real_cache, 2)[:, :32]
    with torch.no_grad():
        clean, clean_cache = smollm2.run_with_cache(tokens, names_filter=[HOOK])
        x = clean_cache[HOOK]
        with splice_sae(smollm2, sae, use_error_term=True) as spliced:
            spliced_logits, latents = spliced.run_with_cache(tokens)
            f = latents[f"{HOOK}.hook_sae_acts_post"]
            j = int(f[0, 5].argmax())

            def ablate(acts, hook):
                acts[..., j] = 0
                return acts

            with spliced.hooks([("hook_sae_acts_post", ablate)]):
                _, ablated = smollm2.run_with_cache(tokens, names_filter=[NEXT_HOOK])
        torch.testing.assert_close(spliced_logits, clean, atol=2e-3, rtol=1e-4)
        torch.testing.assert_close(f, _topk_encode(sae, x), atol=1e-4, rtol=1e-4)
        # ablating latent j moves the hook's output by exactly -f_j W_dec[j], at every position
        expected = x - f[..., j, None] * sae.W_dec[j]
        torch.testing.assert_close(ablated[NEXT_HOOK], expected, atol=2e-3, rtol=1e-4)
        assert float(f[0, 5, j]) > 0

        assert not smollm2.hook_dict[HOOK].fwd_hooks and not spliced.hook_sae_acts_post.fwd_hooks
        assert torch.equal(smollm2(tokens), clean)
        with pytest.raises(RuntimeError, match="inside"), splice_sae(smollm2, sae):
            raise RuntimeError("inside")
        assert not smollm2.hook_dict[HOOK].fwd_hooks


def test_splice_without_error_term_gives_the_evaluate_stage_ce_loss(smollm2, sae, sae_path, real_cache, tmp_path):
    metrics = evaluate(EvalConfig(sae_path=str(sae_path), cache_path=str(real_cache.path), n_ce_sequences=1,
                                  n_eval_tokens=512, output_path=str(tmp_path / "m.json")), model=smollm2)
    tokens = _holdout_tokens(real_cache, 1)
    with torch.no_grad():
        # a hand-written splice and cross-entropy, independent of pipeline.analysis.splice
        logits = smollm2.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda act, hook: _topk_encode(sae, act) @ sae.W_dec + sae.b_dec)])
        logp = torch.log_softmax(logits[:, :-1].double(), -1)
        ce = -float(logp.gather(-1, tokens[:, 1:, None]).mean())
        with splice_sae(smollm2, sae):
            spliced = float(smollm2(tokens, return_type="loss"))
    assert metrics["ce_loss_with_sae"] == pytest.approx(ce, rel=1e-4)
    assert spliced == pytest.approx(ce, rel=1e-4)
    assert metrics["ce_loss_clean"] < metrics["ce_loss_with_sae"] < metrics["ce_loss_zero_ablation"]


# --------------------------------------------------------------------------- steering


def test_steering_adds_exactly_strength_times_the_decoder_row(smollm2, sae):
    tokens = smollm2.to_tokens(TEXT, prepend_bos=False)
    feature, strength = 11, 7.5
    clean = _hook_acts(smollm2, tokens, NEXT_HOOK)
    with steer(smollm2, sae, feature, strength):
        steered = _hook_acts(smollm2, tokens, NEXT_HOOK)
    with steer(smollm2, sae, feature, strength, from_position=5):
        late = _hook_acts(smollm2, tokens, NEXT_HOOK)
    delta = (strength * sae.W_dec[feature]).expand_as(clean)
    torch.testing.assert_close(steered - clean, delta, atol=2e-4, rtol=0)
    torch.testing.assert_close(late[:, :5], clean[:, :5], atol=0, rtol=0)
    torch.testing.assert_close(late[:, 5:] - clean[:, 5:], delta[:, 5:], atol=2e-4, rtol=0)
    assert not smollm2.hook_dict[HOOK].fwd_hooks


def test_steered_generation_is_reproducible_and_steers(smollm2, sae):
    feature = int(read_features(smollm2, sae, TEXT).top_features(1)[1][6, 0])
    kwargs = dict(max_new_tokens=3, seed=3, only_generated=True)
    first = steered_generation(smollm2, sae, "My favourite city is", feature, 60.0, **kwargs)
    again = steered_generation(smollm2, sae, "My favourite city is", feature, 60.0, **kwargs)
    assert (first.unsteered, first.steered) == (again.unsteered, again.steered)
    assert first.steered != first.unsteered


# --------------------------------------------------------------------------- Neuronpedia


def test_neuronpedia_urls_come_from_the_release_registry(sae):
    assert neuronpedia_url("gpt2-small-res-jb", "blocks.8.hook_resid_pre", 1234) == \
        "https://www.neuronpedia.org/gpt2-small/8-res-jb/1234"
    assert neuronpedia_url("gpt2-small-res-jb", "blocks.11.hook_resid_post", 5).endswith("/gpt2-small/12-res-jb/5")
    with pytest.raises(ConfigError, match="does not host"):
        neuronpedia_url("gpt2-small-mlp-tm", "blocks.0.hook_mlp_out", 1)
    with pytest.raises(ConfigError, match="unknown SAE release 'gpt2-small-res-jbb'.*did you mean 'gpt2-small-res-jb'"):
        neuronpedia_url("gpt2-small-res-jbb", "blocks.8.hook_resid_pre", 1)
    import yaml
    from importlib.resources import files

    hosted = yaml.safe_load(files("pipeline.analysis").joinpath(IDS_FILENAME).read_text())["releases"]
    for release, ids in hosted.items():  # every id names a registered SAE
        assert set(ids) <= set(list_sae_ids(release)), release
    assert neuronpedia_url_for(sae, 3) is None
    hosted_sae = _reload(sae)
    hosted_sae.cfg.metadata["neuronpedia_id"] = "smollm2-135m/8-res-test"
    assert neuronpedia_url_for(hosted_sae, 3) == "https://www.neuronpedia.org/smollm2-135m/8-res-test/3"


# --------------------------------------------------------------------------- CLI and dashboard


@pytest.fixture
def cli_model(monkeypatch, smollm2):
    """The CLI loads the SAE's model by name; hand it the session's copy (loading is tested in test_models)."""
    loaded = []
    monkeypatch.setattr(models, "load_model", lambda name, device="cpu", dtype=None: loaded.append(name) or smollm2)
    return loaded


def test_cli_features_prints_the_table_and_refuses_a_mismatch(cli_model, smollm2, sae, sae_path):
    result = CliRunner().invoke(cli, ["features", "--sae-path", str(sae_path), "--text", TEXT, "--top-k", "2"])
    assert result.exit_code == 0, result.output
    tf = read_features(smollm2, sae, TEXT)
    values, indices = tf.top_features(2)
    line = next(row for row in result.output.splitlines() if "'iffel'" in row)
    assert line.split()[0] == "2" and f"{int(indices[2, 0])}:{float(values[2, 0]):.2f}" in line
    assert cli_model == ["smollm2-135m"]
    from stages.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["features", "--sae-path", str(sae_path), "--text", TEXT, "--model", "gpt2"])
    assert exit_info.value.code == 2 and cli_model == ["smollm2-135m"]  # refused before loading anything


def test_cli_max_examples_steer_and_attribute(cli_model, sae_path, active):
    runner = CliRunner()
    ids = ",".join(map(str, active[:2]))
    examples = runner.invoke(cli, ["max-examples", "--sae-path", str(sae_path), "--features", ids, "--n-examples", "2"])
    assert examples.exit_code == 0, examples.output
    assert [int(f) for f in re.findall(r"feature (\d+): fires", examples.output)] == active[:2]
    assert examples.output.count("[[") == 4
    steered = runner.invoke(cli, ["steer", "--sae-path", str(sae_path), "--feature", str(active[0]), "--strength", "30",
                                  "--prompt", "Hello", "--max-new-tokens", "2"])
    assert steered.exit_code == 0, steered.output
    assert "unsteered" in steered.output and f"feature {active[0]}, strength 30" in steered.output
    attributed = runner.invoke(cli, ["attribute", "--sae-path", str(sae_path), "--prompt", "The capital of France is",
                                     "--target", " Paris", "--top-n", "3"])
    assert attributed.exit_code == 0, attributed.output
    assert re.search(r"sum of \d+ latents [+-][\d.]+ \+ error [+-][\d.]+ \+ bias [+-][\d.]+ = [+-][\d.]+ \(direct path\)",
                     attributed.output), attributed.output


def _chromium(url: str, tmp_path: Path) -> tuple[str, str]:
    """``(DOM after scripts ran, browser log)`` of ``url`` in headless Chromium."""
    assert CHROMIUM.is_file(), "headless Chromium is missing: apt-get install chromium chromium-driver (see README)"
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    run = subprocess.run([str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout, run.stderr


def test_dashboard_renders_in_headless_chromium_without_console_errors(cli_model, smollm2, sae, sae_path, real_cache,
                                                                    active, tmp_path):
    known, second = active[0], active[1]
    stats = max_activating_examples(real_cache, sae, [known], n_examples=3, progress=False)[known]
    page = tmp_path / "dash.html"
    result = CliRunner().invoke(cli, ["dashboard", "--sae-path", str(sae_path), "--features", ",".join(map(str, active)),
                                      "--n-examples", "3", "--output-path", str(page)])
    assert result.exit_code == 0, result.output
    dom, log = _chromium(page.as_uri(), tmp_path)
    assert 'data-rendered="true"' in dom and f'data-features="{len(active)}"' in dom
    assert "CONSOLE" not in log, [line for line in log.splitlines() if "CONSOLE" in line]
    section = dom[dom.index(f'id="feature-{known}"'): dom.index(f'id="feature-{second}"')]
    contexts = re.findall(r'<div class="ctx" data-seq="(\d+)" data-pos="(\d+)">(.*?)</div>', section)
    assert [(int(s), int(p)) for s, p, _ in contexts] == [(ex.seq, ex.pos) for ex in stats.examples]
    for (_, _, shown), ex in zip(contexts, stats.examples):
        tokens = re.findall(r'<span class="tok[^"]*"[^>]*>(.*?)</span>', shown)
        expected = [smollm2.tokenizer.decode([t]).replace("\n", "↵") for t in ex.token_ids]
        assert [html.unescape(t) for t in tokens] == expected
        peak = re.search(r'<span class="tok peak"[^>]*>(.*?)</span>', shown).group(1)
        assert html.unescape(peak) == expected[ex.peak_index]
    assert 'title="activation' in section  # the script's hover titles
    assert f"{stats.frequency:.4%}" in section and "promoted" in section


def test_the_chromium_check_sees_console_errors(tmp_path):
    broken = tmp_path / "broken.html"
    write_dashboard(broken, "<!DOCTYPE html><html><body><script>undefinedFunction();</script></body></html>")
    _, log = _chromium(broken.as_uri(), tmp_path)
    assert "Uncaught ReferenceError" in log


def test_build_dashboard_picks_the_most_frequent_latents(real_cache, sae, smollm2):
    frequency = firing_frequencies(real_cache, sae, progress=False)
    page = build_dashboard(real_cache, sae, tokenizer=smollm2.tokenizer, top_n=2, n_examples=1, progress=False)
    shown = [int(i) for i in re.findall(r'data-feature="(\d+)"', page)]
    assert shown == np.argsort(-frequency, kind="stable")[:2].tolist()
