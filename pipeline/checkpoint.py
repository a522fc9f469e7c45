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
mid-write never leaves a checkpoint that looks whole; a write the OS refuses (disk full) removes the
temporary folder and raises :class:`~pipeline.errors.SAEWriteError` (:func:`refused_writes`). The
loader position is not stored: the loader is deterministic given the seed, and a resumed run skips
the batches already consumed.
"""

from __future__ import annotations

import copy
import errno
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from pipeline.cache import describe_os_error
from pipeline.errors import ConfigError, SAEWriteError

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

    Raises:
        SAEWriteError: the OS refused a write (disk full, quota, read-only); the temporary folder
            is removed and the checkpoints written before stay complete (:func:`refused_writes`).
    """
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with refused_writes(f"checkpoint {folder.name}", folder, folder.parent):
            tmp.mkdir(parents=True)
            folded = copy.deepcopy(sae)
            folded.fold_activation_scale(activation_scale)
            folded.save(tmp, sparsity=sparsity)
            with open(tmp / STATE_FILENAME, "wb") as f:  # a Python file: torch's write error keeps the OSError
                torch.save({**state, "activation_scale": activation_scale}, f)
            _fsync_tree(tmp)  # on disk before the rename makes it visible (power loss, not only kills)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # gives the space back; list_checkpoints never lists a .tmp
        raise
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


# Per OS error refusing a write: what it means, and what the user does about it.
_WRITE_PROBLEMS = {
    errno.ENOSPC: ("the disk is full", "free space on that filesystem"),
    errno.EDQUOT: ("the disk quota is used up", "free space or raise your quota on that filesystem"),
    errno.EROFS: ("the filesystem is read-only", "make it writable"),
    errno.EACCES: ("the folder is not writable", "make it writable for this user"),
    errno.EPERM: ("the folder is not writable", "make it writable for this user"),
}


@contextmanager
def refused_writes(what: str, target: Path, checkpoint_dir: Path) -> Iterator[None]:
    """Turn the OS refusing a write of ``what`` at ``target`` (disk full, quota, read-only) into
    an :class:`SAEWriteError` (:func:`write_error`); other errors pass unchanged."""
    try:
        yield
    except Exception as err:
        cause = _os_error_behind(err, target)
        if cause is None:
            raise
        raise write_error(what, target, cause, checkpoint_dir) from None


def write_error(what: str, target: Path, err: OSError, checkpoint_dir: Path) -> SAEWriteError:
    """The error training raises when the OS refuses a write: the path, what the OS error means,
    the OS error and file, the free space there, the last complete checkpoint in
    ``checkpoint_dir`` and how to continue from it."""
    problem, fix = _WRITE_PROBLEMS.get(err.errno, ("the OS refused the write", "remove the cause it names"))
    kept = list_checkpoints(checkpoint_dir)
    if kept:
        then = (f"The last complete checkpoint, {kept[-1]}, is kept. Fix: {fix}, then continue from it: rerun "
                "the same `sae-pipeline train` command with --resume, or the same `sae-pipeline sweep` command "
                "(it resumes interrupted points)")
    else:
        then = (f"No checkpoint was written before it. Fix: {fix}, then rerun the same `sae-pipeline train` "
                "command with --overwrite, or the same `sae-pipeline sweep` command")
    return SAEWriteError(f"cannot write {what} to {target}, {problem}: {describe_os_error(err, Path(target))}. "
                         f"Nothing half-written reads as complete. {then}.")


def _os_error_behind(err: BaseException | None, path: Path) -> OSError | None:
    """The OS error behind a failed write: ``err`` itself, the one torch's writer raised over (its
    ``__context__``), or one safetensors names only in its message (``"... (os error 28)"``)."""
    while err is not None:
        if isinstance(err, OSError):
            return err
        code = re.search(r"\(os error (\d+)\)", str(err))
        if code:
            return OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path))
        err = err.__cause__ or err.__context__
    return None


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


def load_resumable(folder: Path, config: dict[str, Any], cache: dict[str, Any]) -> dict[str, Any]:
    """The training state in checkpoint ``folder``, once checked that it may continue a run of
    ``config`` (``TrainConfig.to_dict()``) on the cache whose identity is ``cache``.

    Raises:
        ConfigError: the checkpoint is damaged, or was written with another config or cache
            (:func:`load_checkpoint_state`, :func:`check_resumable`, :func:`check_same_cache`).
    """
    saved = load_checkpoint_state(folder)
    check_resumable(saved["config"], config)
    check_same_cache(saved.get("cache", {}), cache)
    return saved


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
