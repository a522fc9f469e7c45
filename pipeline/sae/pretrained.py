"""Load published SAEs by their SAELens release name, from the Hugging Face cache::

    from pipeline.sae.pretrained import from_pretrained, list_releases

    sae, cfg_dict, sparsity = from_pretrained("gpt2-small-res-jb", "blocks.8.hook_resid_pre")

Resolution, step by step:

1. ``(release, sae_id)`` → Hugging Face ``repo_id`` and the SAE's folder in it, through
   ``pretrained_saes.yaml`` (package data next to this module; its facts are SAELens 6.54.12's
   ``pretrained_saes.yaml``). A release that is not listed but looks like a repo id
   (``"org/name"``) is used as the repo, with ``sae_id`` as the folder, as SAELens does.
2. The folder's ``cfg.json`` and ``sae_weights.safetensors`` (and ``sparsity.safetensors`` when
   present) are taken from the Hugging Face hub cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``,
   else huggingface_hub's default, usually ``~/.cache/huggingface/hub``). Only when a file is
   missing there and ``HF_HUB_OFFLINE`` is not set are they downloaded (``hf_hub_download``).
3. The folder is read by :func:`pipeline.sae.io.load_sae` (which maps pre-6.0 SAELens configs);
   a ``norm_scaling_factor`` from the registry is folded in as SAELens does.

Only releases stored as plain SAELens folders are listed; the registry's ``unsupported`` section
names the SAELens releases left out (Gemma Scope's ``params.npz``, JumpReLU, ...) and why.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import warnings
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, NoReturn

import yaml
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
from torch import Tensor

from pipeline.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME
from pipeline.errors import ConfigError, SAEFormatError
from pipeline.sae.base import SAE, closest_name_hint
from pipeline.tracking import network_reachable
from pipeline.sae.io import load_sae, load_sparsity

REGISTRY_FILENAME = "pretrained_saes.yaml"
HUB_URL = "https://huggingface.co"
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}  # how huggingface_hub reads HF_HUB_OFFLINE
_MAX_LISTED_IDS = 10


class PretrainedSAENotFoundError(SAEFormatError):
    """A registered SAE's files are neither in the Hugging Face cache nor downloadable now.

    The message names the repo, the files, the cache folder and the commands that fix it.
    """


@dataclass(frozen=True)
class PretrainedSAE:
    """Where one published SAE lives.

    Fields:
        release, sae_id: SAELens's names for it.
        repo_id: Hugging Face model repo.
        path: the SAE's folder inside the repo ("" for the repo root).
        model: model the SAE was trained on ("" when not registered).
        norm_scaling_factor: input scale the SAE was trained with, or None.
    """

    release: str
    sae_id: str
    repo_id: str
    path: str
    model: str = ""
    norm_scaling_factor: float | None = None

    def repo_file(self, name: str) -> str:
        """``name`` (e.g. ``cfg.json``) as a path inside the repo."""
        return f"{self.path}/{name}" if self.path else name


@functools.cache
def _registry() -> dict[str, Any]:
    """The parsed ``pretrained_saes.yaml`` (keys ``releases`` and ``unsupported``)."""
    text = files("pipeline.sae").joinpath(REGISTRY_FILENAME).read_text(encoding="utf-8")
    return yaml.safe_load(text)


def list_releases() -> list[str]:
    """Sorted names of the releases :func:`from_pretrained` knows (``pretrained_saes.yaml``)."""
    return sorted(_registry()["releases"])


def list_sae_ids(release: str) -> list[str]:
    """The SAE ids of ``release``, in registry order.

    Raises:
        ConfigError / SAEFormatError: as :func:`resolve` for an unknown or unsupported release.
    """
    return list(_release_entry(release)["saes"])


def _release_entry(release: str) -> dict[str, Any]:
    registry = _registry()
    if release in registry["releases"]:
        return registry["releases"][release]
    for pattern, reason in registry.get("unsupported", {}).items():
        if fnmatch.fnmatchcase(release, pattern):
            raise SAEFormatError(
                f"SAELens release {release!r} is not supported: {reason}. Load it with SAELens, or "
                "convert it to a cfg.json + sae_weights.safetensors folder and use SAE.load(folder)."
            )
    known = list_releases()
    raise ConfigError(
        f"unknown SAE release {release!r}{closest_name_hint(release, known)}; known releases: "
        f"{', '.join(known)}. A Hugging Face repo id ('org/name') also works, with sae_id = the "
        "SAE's folder in that repo."
    )


def resolve(release: str, sae_id: str) -> PretrainedSAE:
    """Map ``(release, sae_id)`` to its repo and folder (no file access).

    Raises:
        ConfigError: unknown release or sae_id (the message suggests the closest name).
        SAEFormatError: a SAELens release deliberately left out (the message says why).
    """
    if release not in _registry()["releases"] and "/" in release:
        return PretrainedSAE(release, sae_id, repo_id=release, path=sae_id.strip("/"))
    entry = _release_entry(release)
    saes = entry["saes"]
    if sae_id not in saes:
        ids = list(saes)
        shown = ", ".join(ids[:_MAX_LISTED_IDS]) + (", ..." if len(ids) > _MAX_LISTED_IDS else "")
        raise ConfigError(
            f"release {release!r} has no SAE {sae_id!r}{closest_name_hint(sae_id, ids)}; "
            f"its {len(ids)} SAE ids: {shown} (list_sae_ids({release!r}) gives all)."
        )
    sae = saes[sae_id]
    return PretrainedSAE(release, sae_id, repo_id=entry["repo_id"], path=str(sae["path"]),
                         model=entry.get("model", ""),
                         norm_scaling_factor=sae.get("norm_scaling_factor"))


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (not at import, as
    ``huggingface_hub.constants`` does): ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else the default."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to 1/on/yes/true now (or was at huggingface_hub import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    return value.upper() in _TRUE_VALUES if value is not None else bool(constants.HF_HUB_OFFLINE)


def _cached(sae: PretrainedSAE, name: str, cache_dir: Path) -> str | None:
    hit = try_to_load_from_cache(sae.repo_id, sae.repo_file(name), cache_dir=cache_dir)
    return hit if isinstance(hit, str) else None  # None, or the "known absent" marker


def _download(sae: PretrainedSAE, name: str, cache_dir: Path) -> tuple[str | None, str]:
    """``(local path, "")``, or ``(None, why it failed)``; never raises for network failures."""
    try:
        return hf_hub_download(sae.repo_id, sae.repo_file(name), cache_dir=cache_dir), ""
    except LocalEntryNotFoundError as err:  # no connection (or offline) and not cached
        return None, f"the Hub could not be reached ({err})"
    except EntryNotFoundError:
        return None, f"the repo has no file {sae.repo_file(name)}"
    except (HfHubHTTPError, OSError) as err:  # missing/gated repo, HTTP or disk errors
        return None, f"download failed ({type(err).__name__}: {err})"


def _fetch_files(sae: PretrainedSAE, cache_dir: Path, offline: bool) -> tuple[Path, Path | None]:
    """Folder holding cfg.json + sae_weights.safetensors, and sparsity.safetensors or None.

    All from the cache when the required pair is there; else (online) all downloaded, so the
    files come from one repo revision.

    Raises:
        PretrainedSAENotFoundError: a required file is not cached and cannot be downloaded.
    """
    required = (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME)
    paths = {name: _cached(sae, name, cache_dir) for name in required}
    sparsity = _cached(sae, SPARSITY_FILENAME, cache_dir)
    if not all(paths.values()):
        if offline:
            _raise_not_found(sae, cache_dir, {n: "not in the cache, and HF_HUB_OFFLINE is set"
                                              for n, p in paths.items() if not p}, offline)
        if not network_reachable("huggingface.co"):  # fail in seconds, not after the Hub's retries
            _raise_not_found(sae, cache_dir, {n: "not in the cache, and huggingface.co cannot be reached"
                                              for n, p in paths.items() if not p}, offline)
        fetched = {name: _download(sae, name, cache_dir) for name in required}
        failures = {name: why for name, (path, why) in fetched.items() if path is None}
        if failures:
            _raise_not_found(sae, cache_dir, failures, offline)
        paths = {name: path for name, (path, _) in fetched.items()}
        sparsity = _download(sae, SPARSITY_FILENAME, cache_dir)[0]  # optional: absent is fine
    folder = Path(paths[SAE_CFG_FILENAME]).parent
    if Path(paths[SAE_WEIGHTS_FILENAME]).parent != folder:
        raise SAEFormatError(
            f"{sae.repo_id}: cfg.json and sae_weights.safetensors resolved to different revisions "
            f"({folder} vs {Path(paths[SAE_WEIGHTS_FILENAME]).parent}); delete "
            f"{cache_dir / _repo_folder(sae.repo_id)} and load again."
        )
    return folder, Path(sparsity).parent if sparsity else None


def _repo_folder(repo_id: str) -> str:
    return "models--" + repo_id.replace("/", "--")


def _raise_not_found(sae: PretrainedSAE, cache_dir: Path, why: dict[str, str], offline: bool) -> NoReturn:
    """Raise :class:`PretrainedSAENotFoundError` saying what to download and where to put it."""
    needed = [sae.repo_file(SAE_CFG_FILENAME), sae.repo_file(SAE_WEIGHTS_FILENAME)]
    optional = sae.repo_file(SPARSITY_FILENAME)
    problems = "\n".join(f"  {sae.repo_file(name)}: {reason}" for name, reason in why.items())
    urls = "\n".join(f"    {HUB_URL}/{sae.repo_id}/resolve/main/{f}" for f in [*needed, optional])
    raise PretrainedSAENotFoundError(
        f"SAE {sae.sae_id!r} of release {sae.release!r} (Hugging Face repo {sae.repo_id}, folder "
        f"{sae.path or '/'}) cannot be loaded:\n{problems}\n"
        f"Fix it in one of these ways:\n"
        f"  1. With network access, download into this Hugging Face cache ({cache_dir}):\n"
        f"       hf download {sae.repo_id} {' '.join(needed)} --cache-dir {cache_dir}\n"
        f"     (and {optional}, the optional latent densities, if the repo has it). Without network "
        f"here, run it on another machine and copy its {_repo_folder(sae.repo_id)} folder into "
        f"{cache_dir}."
        f"{' Or unset HF_HUB_OFFLINE to let from_pretrained download them.' if offline else ''}\n"
        f"  2. Or fetch these files into any folder (sparsity.safetensors is optional):\n{urls}\n"
        f"     and load that folder with SAE.load(folder)."
    )


def from_pretrained(
    release: str, sae_id: str, device: str = "cpu"
) -> tuple[SAE, dict[str, Any], Tensor | None]:
    """Load a published SAE as SAELens's ``SAE.from_pretrained_with_cfg_and_sparsity`` does.

    Args:
        release: SAELens release name (:func:`list_releases`), or a Hugging Face repo id.
        sae_id: SAE id within the release (:func:`list_sae_ids`), or the folder in the repo.
        device: torch device for the parameters.

    Returns:
        ``(sae, cfg_dict, sparsity)``: the SAE (subclass named by cfg.json); the parsed cfg.json
        (with ``normalize_activations`` set to ``"none"`` once a norm scaling factor is folded,
        as SAELens reports it); the ``[d_sae]`` log10 feature density of
        ``sparsity.safetensors``, or None when that optional file is not cached (nothing is
        downloaded for it alone) or, on a download, not in the repo.

    Raises:
        ConfigError: unknown release or sae_id (with the closest name).
        SAEFormatError: a release left out on purpose (names the reason), or files that
            :func:`pipeline.sae.io.load_sae` rejects.
        PretrainedSAENotFoundError: the files are not cached and cannot be downloaded (names the
            repo, the files and where to put them).
    """
    sae_info = resolve(release, sae_id)
    cache_dir = hub_cache_dir()
    folder, sparsity_folder = _fetch_files(sae_info, cache_dir, hub_offline())
    sae = load_sae(folder, device=device)
    cfg_dict = json.loads((folder / SAE_CFG_FILENAME).read_text(encoding="utf-8"))
    if sae.cfg.normalize_activations == "expected_average_only_in":
        _fold_norm_scaling(sae, cfg_dict, sae_info)
    sparsity = load_sparsity(sparsity_folder) if sparsity_folder else None
    return sae, cfg_dict, sparsity


def _fold_norm_scaling(sae: SAE, cfg_dict: dict[str, Any], sae_info: PretrainedSAE) -> None:
    """Fold the registry's ``norm_scaling_factor`` so the SAE takes raw activations (SAELens)."""
    if sae_info.norm_scaling_factor is None:
        warnings.warn(
            f"{sae_info.release}/{sae_info.sae_id} expects inputs scaled by a norm scaling factor "
            "the registry does not record; scale activations yourself, then call "
            "sae.fold_activation_scale(factor).",
            stacklevel=3,
        )
        return
    sae.fold_activation_scale(sae_info.norm_scaling_factor)
    cfg_dict["normalize_activations"] = "none"
