"""Property-based tests: generated configs and damaged cfg.json / cache metadata must end in one of
our documented errors (``pipeline.errors``) or in a working object, never in a traceback from deep
inside a library."""

import json
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.cache import ActivationCache
from pipeline.config import EvalConfig, HarvestConfig, TrainConfig
from pipeline.errors import SaePipelineError
from pipeline.sae import SAE, SAEConfig, get_architecture

from .conftest import write_synthetic_cache

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # "field ignored by this architecture"
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Any JSON value, as a damaged or hand-written file may hold.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def _mutations(keys: list[str]):
    """Lists of edits to a JSON object: replace a key's value, delete a key, or add a new key."""
    edit = st.one_of(
        st.tuples(st.just("set"), st.sampled_from(keys), json_values),
        st.tuples(st.just("del"), st.sampled_from(keys), st.none()),
        st.tuples(st.just("add"), st.text(min_size=1, max_size=10), json_values),
    )
    return st.lists(edit, min_size=1, max_size=4)


def _apply(data: dict, edits) -> dict:
    data = json.loads(json.dumps(data))
    for kind, key, value in edits:
        if kind == "del":
            data.pop(key, None)
        else:
            data[key] = value
    return data


@pytest.mark.parametrize("config_class", [TrainConfig, HarvestConfig, EvalConfig])
@SETTINGS
@given(data=st.data())
def test_generated_configs_are_accepted_or_refused_with_our_error(config_class, data):
    fields = list(config_class.__dataclass_fields__)
    known = data.draw(st.dictionaries(st.sampled_from(fields), json_values, max_size=5))
    unknown = data.draw(st.dictionaries(st.text(min_size=1, max_size=10), json_values, max_size=2))
    try:
        config_class.from_dict({**known, **unknown})
    except SaePipelineError:
        pass


@pytest.fixture(scope="module")
def saved_saes(tmp_path_factory):
    """One saved SAE folder per architecture (small, random weights)."""
    root = tmp_path_factory.mktemp("saes")
    folders = {}
    for arch, k in [("standard", None), ("topk", 4), ("gated", None), ("jumprelu", None), ("batchtopk", 4.0)]:
        torch.manual_seed(0)
        sae = get_architecture(arch)(SAEConfig(arch, d_in=8, d_sae=16, k=k, hook_name="blocks.0.hook_resid_pre"))
        folders[arch] = sae.save(root / arch)
    return folders


@pytest.mark.parametrize("arch", ["standard", "topk", "gated", "jumprelu", "batchtopk"])
@SETTINGS
@given(data=st.data())
def test_damaged_cfg_json_loads_or_raises_our_error(saved_saes, tmp_path_factory, arch, data):
    source = saved_saes[arch]
    raw = json.loads((source / "cfg.json").read_text())
    edits = data.draw(_mutations(sorted(raw)))
    folder = tmp_path_factory.mktemp("damaged")
    shutil.copytree(source, folder, dirs_exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(_apply(raw, edits)))
    try:
        sae = SAE.load(folder)
    except SaePipelineError:
        return
    x = torch.randn(3, sae.cfg.d_in)
    assert sae(x).shape == (3, sae.cfg.d_in)  # whatever loaded must also run


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "c"
    acts = np.random.default_rng(0).normal(size=(16 * 8, 6)).astype(np.float32)
    tokens = np.arange(16 * 8, dtype=np.int32).reshape(16, 8) % 40
    write_synthetic_cache(path, acts, tokens, chunk_tokens=32, n_holdout_chunks=1)
    return path


@SETTINGS
@given(data=st.data())
def test_damaged_cache_metadata_opens_or_raises_our_error(small_cache, tmp_path_factory, data):
    meta = json.loads((small_cache / "zarr.json").read_text())
    attrs = meta["attributes"]
    edits = data.draw(_mutations(sorted(attrs)))
    folder = tmp_path_factory.mktemp("damaged") / "c"
    shutil.copytree(small_cache, folder)
    (folder / "zarr.json").write_text(json.dumps({**meta, "attributes": _apply(attrs, edits)}))
    try:
        cache = ActivationCache.open(folder)
        hook = cache.resolve_hook(None) if len(cache.hook_names) == 1 else cache.hook_names[0]
        for i in cache.train_chunks[:1] + cache.holdout_chunks[:1]:
            assert cache.read_chunk(hook, i, verify=True).shape[1] == cache.d_in_of(hook)
            assert len(cache.chunk_token_ids(i)) == cache.layout.chunk_rows(i)[1] - cache.layout.chunk_rows(i)[0]
        cache.statistics(hook)
    except SaePipelineError:
        pass
