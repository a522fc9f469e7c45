"""Training checkpoints: what a run needs to continue exactly where it stopped.

A checkpoint is a folder ``<checkpoint_dir>/step_<step>/`` holding

- the SAE in SAELens layout (``cfg.json``, ``sae_weights.safetensors``, ``sparsity.safetensors``),
  folded to take raw activations, so any checkpoint loads with ``SAE.load`` or SAELens for
  evaluation;
- ``training_state.pt``: the unfolded parameters, the Adam state, the trainer's counters
  (step, tokens, dead-latent and density statistics), torch's RNG state, the activation scale and
  the training config. It holds only tensors and plain Python values, and is read with
  ``torch.load(weights_only=True)`` (no arbitrary pickle).

The folder is written under a temporary name, fsynced and renamed when complete, so a crash
mid-write never leaves a checkpoint that looks whole. The loader position is not stored: the loader is
deterministic given the seed, and a resumed run skips the batches already consumed.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import ConfigError

STATE_FILENAME = "training_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_folder(checkpoint_dir: Path, step: int) -> Path:
    """``<checkpoint_dir>/step_<step, zero-padded to 9 digits>``."""
    return Path(checkpoint_dir) / f"step_{step:09d}"


def save_checkpoint(folder: Path, sae, activation_scale: float, sparsity: torch.Tensor | None,
                    state: dict[str, Any]) -> Path:
    """Write checkpoint ``folder`` atomically (see module docstring); returns it.

    Args:
        sae: the SAE being trained (training scale; it is copied, not modified).
        activation_scale: the factor the batches were multiplied by (folded into the saved copy).
        sparsity: ``[d_sae]`` log10 feature density for ``sparsity.safetensors``, or None.
        state: the training state (``sae``, ``optimizer``, ``trainer``, ``rng``, ``config``, ...).
    """
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    folded = copy.deepcopy(sae)
    folded.fold_activation_scale(activation_scale)
    folded.save(tmp, sparsity=sparsity)
    torch.save({**state, "activation_scale": activation_scale}, tmp / STATE_FILENAME)
    _fsync_tree(tmp)  # on disk before the rename makes it visible (power loss, not only kills)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    _fsync_tree(folder.parent, files=False)
    return folder


def _fsync_tree(folder: Path, files: bool = True) -> None:
    """fsync every file directly in ``folder`` (unless ``files`` is False), then the folder itself."""
    for path in folder.iterdir() if files else ():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoint folders under ``checkpoint_dir``, oldest step first."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILENAME).is_file()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(spec: str, checkpoint_dir: Path) -> Path:
    """The checkpoint folder ``spec`` names: a folder path, or ``"latest"`` in ``checkpoint_dir``.

    Raises:
        ConfigError: no checkpoint there (the message says where it looked).
    """
    if spec == "latest":
        found = list_checkpoints(checkpoint_dir)
        if not found:
            raise ConfigError(
                f"resume_from_checkpoint: latest, but {checkpoint_dir} holds no complete checkpoint; "
                "train with n_checkpoints > 0 first, or start without resume_from_checkpoint."
            )
        return found[-1]
    folder = Path(spec)
    if not folder.exists():
        raise ConfigError(f"resume_from_checkpoint {spec!r} does not exist; pass a step_* folder under "
                          f"{checkpoint_dir} or 'latest'.")
    if not (folder / STATE_FILENAME).is_file():
        raise ConfigError(
            f"resume_from_checkpoint {spec!r} is not a checkpoint folder (no {STATE_FILENAME}); "
            f"pass a step_* folder under {checkpoint_dir} or 'latest'."
        )
    return folder


def load_checkpoint_state(folder: Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The training state saved in ``folder`` (tensors mapped to ``device``).

    Raises:
        ConfigError: the file is damaged or not a training state (names the file and the fix).
    """
    path = Path(folder) / STATE_FILENAME
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ConfigError(f"checkpoint {path} cannot be read ({type(err).__name__}); it is damaged. "
                          "Resume from an earlier step_* folder or start a new run.") from None
    missing = {"sae", "optimizer", "trainer", "rng", "config"} - set(state if isinstance(state, dict) else ())
    if missing:
        raise ConfigError(f"checkpoint {path} lacks {sorted(missing)}; it was not written by this trainer.")
    return state


# Fields that may differ between the run that wrote a checkpoint and the run resuming it.
RESUMABLE_CHANGES = frozenset({
    "resume_from_checkpoint", "overwrite", "n_checkpoints", "checkpoint_path", "log_every",
    "log_to_wandb", "wandb_project", "wandb_entity", "run_name", "wandb_log_frequency",
    "num_workers", "prefetch_batches", "output_path", "device",
})


def check_resumable(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume when a field that shapes the run differs from the checkpoint's config.

    Raises:
        ConfigError: names each differing field with both values.
    """
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}"
             for k in sorted(set(saved) | set(current))
             if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k)]
    if diffs:
        raise ConfigError(
            "cannot resume: the config differs from the checkpoint's in " + "; ".join(diffs)
            + ". Use the checkpoint's values (see its training_state.pt config) or start a new run."
        )


def check_same_cache(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume on a cache other than the one the checkpoint trained on.

    Raises:
        ConfigError: names the differing cache attributes.
    """
    diffs = [k for k in saved if saved[k] != current.get(k)]
    if diffs:
        raise ConfigError(
            f"cannot resume: the cache at cache_path differs from the one the checkpoint trained on "
            f"({', '.join(diffs)} changed). Point cache_path at the original harvest or start a new run."
        )
