"""Sweeps: a base training config plus a grid, expanded into points trained in fused groups.

A sweep file (``configs/sweeps/<name>.yaml``)::

    name: topk_k_dsae                      # optional; default: the file's stem
    output_path: data/sweeps/topk_k_dsae   # optional; default: data/sweeps/<name>
    base: {cache_path: ..., architecture: topk, training_tokens: 1000000}   # TrainConfig fields
    grid: {k: [16, 32, 64, 128], d_sae: [2304, 4608]}   # cartesian product over lists
    points: [{architecture: standard, l1_coefficient: 5}, {architecture: topk, k: 32}]
    evaluate: {n_ce_sequences: 32}         # EvalConfig fields for the report's evaluation

Points: every entry of ``points`` (or one empty entry) combined with every combination of ``grid``
(so ``points`` pairs fields that go together, such as an architecture and its sparsity knob, and
``grid`` sweeps the rest), each laid over ``base``. A field may sit in ``grid`` or ``points``, not
both; ``output_path``, ``overwrite``, ``checkpoint_path`` and ``resume_from_checkpoint`` are the
sweep's to set. Every point's TrainConfig is validated before anything trains.

Point ids: the architecture and the point's own fields, readable, plus 6 hex digits of the SHA-256
of those fields' canonical JSON (``topk-k32-dsae4608-3fa2c1``). The id does not depend on ``base``
or on the order fields are written in, so editing ``base`` keeps the ids and retrains the points in
place. Each point trains into ``<output_path>/<id>/`` (the SAE as ``train`` writes it,
``train_config.yaml``, ``metrics.jsonl``, and ``point.json``: finished or failed, and the cache's
identity); ``sweep.json`` beside them lists the sweep's current points for the report.

Reruns: a point is skipped when its folder holds a saved SAE, ``point.json`` says finished, its
``train_config.yaml`` equals the new config in every field that shapes the result (all but
:data:`pipeline.checkpoint.RESUMABLE_CHANGES`) and the cache holds the same activations. An
interrupted point (no ``point.json``) whose latest checkpoint (``n_checkpoints`` > 0; they live in
``<output_path>/<id>/checkpoints``) loads, was written with such an equal config and on the same
activations resumes from it and ends with the weights of an uninterrupted run; every other point
(new, changed, failed, interrupted without a usable checkpoint) trains from scratch.

Groups: points that agree on :data:`pipeline.training.STREAM_FIELDS` share one pass of the loader
(:func:`pipeline.training.train_group`); they are packed first-fit decreasing into groups whose
estimated memory (:func:`group_memory_bytes`) fits ``max_memory_gb``. A group is a list of
TrainConfigs and :func:`train_points` returns plain data, so with ``scheduler`` the groups run as
tasks on a Dask cluster (:mod:`pipeline.distributed`) and land in the same folders.
"""

from __future__ import annotations

import difflib
import fcntl
import hashlib
import itertools
import json
import os
import re
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

from pipeline.cache import TORCH_DTYPES, describe_os_error
from pipeline.checkpoint import RESUMABLE_CHANGES, list_checkpoints, load_resumable
from pipeline.config import ARCHITECTURE_FIELDS, EvalConfig, TrainConfig, read_yaml_mapping
from pipeline.constants import SAE_CFG_FILENAME, TRAIN_CONFIG_FILENAME
from pipeline.errors import ConfigError, SAEWriteError, SaePipelineError
from pipeline.sae.io import atomic_write
from pipeline.training import TrainingData, TrainResult, stream_key, train_group

POINT_FILENAME = "point.json"
SWEEP_INDEX_FILENAME = "sweep.json"
DEFAULT_SWEEPS_ROOT = "data/sweeps"
DEFAULT_MAX_MEMORY_GB = 8.0
GIB = 1024**3
MAX_INVALID_SHOWN = 10  # invalid points listed in one error; the rest are counted

_SWEEP_KEYS = ("name", "output_path", "base", "grid", "points", "evaluate")
_SWEEP_OWNED_FIELDS = ("output_path", "overwrite", "checkpoint_path", "resume_from_checkpoint")
_EVAL_OWNED_FIELDS = ("sae_path", "output_path")
# Readable id: these fields first (the order papers plot them in), the rest alphabetically.
_ID_ORDER = ("k", "l1_coefficient", "l0_coefficient", "d_sae", "lr")
_ID_ABBREVIATIONS = {"d_sae": "dsae", "l1_coefficient": "l1", "l0_coefficient": "l0", "training_tokens": "tok",
                     "train_batch_size_tokens": "batch", "aux_loss_coefficient": "auxk",
                     "matryoshka_widths": "widths", "l1_warm_up_steps": "l1warm", "lr_warm_up_steps": "lrwarm"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_READ_UNDER_ANOTHER_NAME = {("jumprelu", "l1_coefficient")}  # TrainConfig reads it as l0_coefficient (SAELens <= 5)


@dataclass
class SweepPoint:
    """One SAE of a sweep: its id, the fields it sets (canonical values, ``architecture`` always
    included) and its full, validated TrainConfig (``output_path`` = the sweep folder / id)."""

    id: str
    params: dict[str, Any]
    cfg: TrainConfig


@dataclass
class Sweep:
    """A loaded sweep file: name, output folder, points in file order, evaluation settings."""

    name: str
    output_path: Path
    points: list[SweepPoint]
    evaluate: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def folder(self, point: SweepPoint) -> Path:
        return self.output_path / point.id


# ------------------------------------------------------------------------------------- loading
def load_sweep(path: str | Path, base_overrides: dict[str, Any] | None = None) -> Sweep:
    """Read and validate the sweep file at ``path``; ``base_overrides`` update its ``base``.

    Raises:
        ConfigError: an empty file, unknown or misplaced keys, an empty or non-list grid entry, a
            field in both ``grid`` and ``points``, a field the sweep sets itself, points whose
            TrainConfig is invalid (the message names each, up to ``MAX_INVALID_SHOWN``, with its
            field), or two identical points (the same id, or configs that train the same SAE).
    """
    raw = read_yaml_mapping(path)
    if not raw:
        raise ConfigError(f"sweep file {str(path)!r} is empty; give it a base of training fields and a grid and/or "
                          "points (see configs/sweeps/).")
    _check_keys(raw, path)
    name = str(raw.get("name") or Path(path).stem)
    if not _NAME.match(name):
        raise ConfigError(f"sweep name {name!r} must be letters, digits, '.', '_' or '-'; rename it in {path}.")
    base = {**_mapping(raw.get("base"), "base"), **(base_overrides or {})}
    grid, entries = _grid(raw.get("grid")), _entries(raw.get("points"))
    _check_owned(base, grid, entries)
    evaluate = _mapping(raw.get("evaluate"), "evaluate")
    _check_evaluate(evaluate)
    output_path = Path(raw.get("output_path") or Path(DEFAULT_SWEEPS_ROOT) / name)
    params_list = expand(grid, entries)
    points, invalid = [], []
    for i, params in enumerate(params_list):
        try:
            points.append(_make_point(name, output_path, base, params, i, len(params_list)))
        except ConfigError as err:  # gather them: one edit of the file should fix every bad point
            invalid.append(str(err))
    if invalid:
        shown = invalid[:MAX_INVALID_SHOWN] + [f"... and {len(invalid) - MAX_INVALID_SHOWN} more"] * (
            len(invalid) > MAX_INVALID_SHOWN)
        raise ConfigError(shown[0] if len(invalid) == 1 else f"{len(invalid)} invalid points:\n  " + "\n  ".join(shown))
    _check_unique(points)
    return Sweep(name, output_path, points, evaluate, str(path))


def expand(grid: dict[str, list[Any]], entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every entry of ``entries`` (or one empty entry) merged with every combination of ``grid``
    (the cartesian product, first grid field varying slowest), entries outermost."""
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    return [{**entry, **combo} for entry in (entries or [{}]) for combo in combos]


def point_id(params: dict[str, Any]) -> str:
    """``<architecture>-<field><value>-...-<6 hex>`` from canonical ``params`` (with ``architecture``).

    The readable part abbreviates common fields (``d_sae`` → ``dsae``, ``l1_coefficient`` → ``l1``,
    as in ``standard-l1_5-dsae4608-…``) and is cut at 60 characters; the hash covers every field and value, so ids are unique and
    independent of field order.
    """
    keys = sorted((k for k in params if k != "architecture"),
                  key=lambda k: (_ID_ORDER.index(k) if k in _ID_ORDER else len(_ID_ORDER), k))
    parts = [_slug(params["architecture"])] + [_id_part(k, params[k]) for k in keys]
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:6]
    return f"{'-'.join(parts)[:60].rstrip('-_')}-{digest}"


def _id_part(key: str, value: Any) -> str:
    """``k32``, ``dsae4608``; ``l1_5`` where the name ends in a digit, so the value stays legible."""
    name = _ID_ABBREVIATIONS.get(key, key.replace("_", ""))
    return name + ("_" if name[-1].isdigit() else "") + _slug(_format_value(value))


def canonical(value: Any) -> Any:
    """A value as it should hash: numbers written as strings become numbers, whole floats ints,
    so ``k: 32``, ``k: 32.0`` and ``lr: '4e-4'`` / ``lr: 0.0004`` give the same id."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:  # exactly representable
        return int(value)
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in sorted(value.items())}
    return value


def _make_point(name: str, root: Path, base: dict[str, Any], params: dict[str, Any], i: int, n: int) -> SweepPoint:
    try:
        cfg = TrainConfig.from_dict({**base, **params})
        _check_fields_read(cfg.architecture, params)
    except ConfigError as err:
        raise ConfigError(f"sweep {name!r}, point {i + 1} of {n} ({_describe(params)}): {err}") from None
    canon = {str(k): canonical(v) for k, v in params.items()}
    canon["architecture"] = cfg.architecture  # always part of the id, and resolved from SAELens aliases
    pid = point_id(canon)
    cfg.output_path, cfg.overwrite = str(root / pid), True  # the sweep owns its point folders
    if "run_name" not in params:
        cfg.run_name = f"{cfg.run_name or name}-{pid}"
    return SweepPoint(pid, canon, cfg)


def _check_fields_read(architecture: str, params: dict[str, Any]) -> None:
    """Refuse a point field its architecture ignores: the point would repeat another SAE."""
    for key in params:
        readers = ARCHITECTURE_FIELDS.get(key, (architecture,))
        if architecture not in readers and (architecture, key) not in _READ_UNDER_ANOTHER_NAME:
            raise ConfigError(f"architecture {architecture!r} does not read {key!r} (only {', '.join(readers)} do), "
                              f"so this point would train the same SAE as another; give {key} only to points of "
                              f"those architectures (in their points entries).")


def _check_keys(raw: dict[str, Any], path: str | Path) -> None:
    for key in raw:
        if key not in _SWEEP_KEYS:
            close = difflib.get_close_matches(str(key), _SWEEP_KEYS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"sweep file {str(path)!r} has unknown key {key!r}.{hint} "
                              f"Keys: {', '.join(_SWEEP_KEYS)} (training fields go under base, grid or points).")


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"sweep {what} must be a mapping of field: value, got {value!r}.")
    return dict(value)


def _grid(value: Any) -> dict[str, list[Any]]:
    grid = _mapping(value, "grid")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.{key} must be a non-empty list of values such as [16, 32], got {values!r}; "
                              "put a fixed value under base.")
    return grid


def _entries(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
        raise ConfigError(f"sweep points must be a list of mappings such as [{{architecture: topk, k: 32}}], "
                          f"got {value!r}.")
    return [dict(e) for e in value]


def _check_owned(base: dict[str, Any], grid: dict[str, Any], entries: list[dict[str, Any]]) -> None:
    """Refuse fields the sweep sets, and a field given by both the grid and a point."""
    for where, keys in [("base", base), ("grid", grid)] + [(f"points[{i}]", e) for i, e in enumerate(entries)]:
        owned = [k for k in keys if k in _SWEEP_OWNED_FIELDS]
        if owned:
            raise ConfigError(f"sweep {where} sets {owned[0]!r}, which the sweep sets itself (each point trains into "
                              "<output_path>/<point id> and resumes from its own checkpoints); remove it (set the "
                              "sweep's top-level output_path to move the whole sweep).")
    for i, entry in enumerate(entries):
        both = sorted(set(entry) & set(grid))
        if both:
            raise ConfigError(f"field {both[0]!r} is in both grid and points[{i}]; keep it in one of them.")


def _check_evaluate(evaluate: dict[str, Any]) -> None:
    owned = [k for k in evaluate if k in _EVAL_OWNED_FIELDS]
    if owned:
        raise ConfigError(f"sweep evaluate sets {owned[0]!r}; the report evaluates each point's folder into its "
                          "metrics.json. Remove it.")
    EvalConfig.from_dict(evaluate)


def _check_unique(points: list[SweepPoint]) -> None:
    """Refuse two points with the same id, or whose configs agree on every field that shapes the
    result (e.g. ``points: [{k: 32}, {}]`` where base or the default gives k 32): both would train
    the same SAE."""
    seen: dict[str, int] = {}
    trained: dict[str, int] = {}
    for i, point in enumerate(points):
        if point.id in seen:
            raise ConfigError(f"sweep points {seen[point.id] + 1} and {i + 1} are the same point ({_describe(point.params)}); "
                              "remove one.")
        seen[point.id] = i
        shaping = json.dumps({k: v for k, v in point.cfg.to_dict().items() if k not in RESUMABLE_CHANGES},
                             sort_keys=True, default=str)
        if shaping in trained:
            j = trained[shaping]
            raise ConfigError(f"sweep points {j + 1} ({_describe(points[j].params)}) and {i + 1} "
                              f"({_describe(point.params)}) train the same SAE: with base and the defaults they "
                              "set every field alike; remove one.")
        trained[shaping] = i


def _describe(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "base only"


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "_".join(_format_value(v) for v in value)
    return str(value)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")


# ------------------------------------------------------------------------------------- reruns
@dataclass
class PointStatus:
    """Where a point stands before a sweep run: ``finished`` (skipped), ``new``, ``changed``
    (``detail`` names what), ``failed`` (``detail``: the error), ``unfinished`` (interrupted;
    ``detail``: resumed from which step, or why from scratch) or ``running`` (another live run holds
    its lock, :func:`claimed_points`; skipped). ``resume_from``: the checkpoint folder an unfinished
    point resumes from, or None."""

    kind: str
    detail: str = ""
    resume_from: str | None = None


def point_status(folder: Path, cfg: TrainConfig, cache_identity: dict[str, Any]) -> PointStatus:
    """Compare ``folder`` with the point's new ``cfg`` and the cache's identity (see module docstring)."""
    if not folder.exists():
        return PointStatus("new")
    record = read_point_record(folder)
    if record.get("status") == "failed":
        return PointStatus("failed", record.get("error", ""))
    if record.get("status") != "finished" or not (folder / SAE_CFG_FILENAME).is_file():
        return _unfinished_status(cfg, cache_identity)
    diffs = config_differences(folder / TRAIN_CONFIG_FILENAME, cfg)
    if record.get("cache") != cache_identity:
        diffs.append("the activations at cache_path")
    return PointStatus("changed", "; ".join(diffs)) if diffs else PointStatus("finished")


def _unfinished_status(cfg: TrainConfig, cache_identity: dict[str, Any]) -> PointStatus:
    """An interrupted point resumes from its newest checkpoint that loads and was written with
    ``cfg``'s values of every field that shapes the result and on the activations
    ``cache_identity`` names (:func:`pipeline.checkpoint.load_resumable`, as ``train`` checks): a
    damaged newest one (a kill mid-write on a filesystem without atomic renames) falls back to the
    one before. With none, from scratch, giving the newest one's reason."""
    found = list_checkpoints(cfg.checkpoint_dir)
    if not found:
        return PointStatus("unfinished", "from scratch, no checkpoint")
    refused: list[str] = []
    for folder in reversed(found):
        try:
            saved = load_resumable(folder, cfg.to_dict(), cache_identity)
        except ConfigError as err:
            refused.append(f"{folder.name} cannot be resumed: {err}")
            continue
        skipped = f" ({'; '.join(refused)})" if refused else ""
        return PointStatus("unfinished", f"resume from step {saved['trainer']['step']} of {cfg.total_steps}{skipped}",
                           str(folder))
    return PointStatus("unfinished", f"from scratch, its latest checkpoint {refused[0]}")


def config_differences(saved_path: Path, cfg: TrainConfig) -> list[str]:
    """``field: old → new`` for each field that shapes the result and differs between the config
    saved at ``saved_path`` (fields it lacks read as their defaults) and ``cfg``."""
    try:
        saved = {**TrainConfig().to_dict(), **read_yaml_mapping(saved_path)}
    except ConfigError:
        return [f"{TRAIN_CONFIG_FILENAME} is missing or unreadable"]
    return [f"{k}: {saved[k]!r} → {v!r}" for k, v in cfg.to_dict().items()
            if k not in RESUMABLE_CHANGES and saved.get(k) != v]


def read_point_record(folder: Path) -> dict[str, Any]:
    """``point.json`` of a point folder, or ``{}`` when absent or unreadable."""
    try:
        return json.loads((Path(folder) / POINT_FILENAME).read_text())
    except (OSError, ValueError):
        return {}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2) + "\n"))


def read_index(sweep_path: str | Path) -> dict[str, Any]:
    """The ``sweep.json`` a sweep run leaves in its folder: name, points (id, params), evaluate.

    Raises:
        ConfigError: the folder holds no readable ``sweep.json``.
    """
    path = Path(sweep_path) / SWEEP_INDEX_FILENAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"{str(sweep_path)!r} is not a sweep folder (no readable {SWEEP_INDEX_FILENAME}); pass the "
                          "folder `sae-pipeline sweep` wrote, e.g. data/sweeps/<name>.") from None


# ------------------------------------------------------------------------------------- memory
def sae_memory_bytes(cfg: TrainConfig, d_in: int) -> tuple[int, int]:
    """Estimated ``(state, step)`` bytes of one SAE in training.

    ``state = 4 · P · b``: parameters, their gradients and Adam's two moments, with
    ``P = 2·d_in·d_sae + 3·d_sae + d_in`` parameters (W_enc, W_dec, biases; gated's and JumpReLU's
    extra per-latent vectors) of ``b`` bytes (4 for float32, 2 for bfloat16).
    ``step = 4 · B · (d_sae + d_in) · 4``: a step's float32 ``[B, d_sae]`` pre-activations, latents
    and their two gradients, and ``[B, d_in]`` input, reconstruction, residual and gradient, with
    ``B = train_batch_size_tokens``. An estimate (TopK keeps fewer dense ``[B, d_sae]`` tensors,
    Matryoshka a few more ``[B, d_in]``), not a measurement.
    """
    n_params = 2 * d_in * cfg.d_sae + 3 * cfg.d_sae + d_in
    state = 4 * n_params * (2 if cfg.dtype == "bfloat16" else 4)
    step = 4 * cfg.train_batch_size_tokens * (cfg.d_sae + d_in) * 4
    return state, step


def stream_memory_bytes(cfg: TrainConfig, d_in: int, storage_bytes: int, train_rows: int | None = None) -> int:
    """Estimated bytes of the loader shared by a group: ``3 · R · d_in · s`` for the shuffle buffer
    of ``R = min(max(shuffle_buffer_tokens, 2B), train_rows)`` rows of ``s``-byte values (held,
    concatenated and permuted; it never holds more than the cache's training rows), plus
    ``(prefetch_batches + 2) · B · d_in · 4`` for the float32 batches queued and in use."""
    rows = max(cfg.shuffle_buffer_tokens, 2 * cfg.train_batch_size_tokens)
    rows = rows if train_rows is None else min(rows, train_rows)
    return 3 * rows * d_in * storage_bytes + (cfg.prefetch_batches + 2) * cfg.train_batch_size_tokens * d_in * 4


def group_memory_bytes(cfgs: Sequence[TrainConfig], d_in: int, storage_bytes: int,
                       train_rows: int | None = None) -> int:
    """``stream + Σ state_i + max_i step_i``: every SAE's state stays resident while the group's
    SAEs step one after another, so one step's activations are alive at a time (batched matrix
    products over stacked SAEs would make that ``Σ step_i``). On the anchor cache this estimates
    1.44 GiB for the 8 TopK points of ``configs/sweeps/topk_k_dsae.yaml``, where peak RSS grew by
    1.02-1.10 GiB in two runs (0.81-0.84 GiB for the largest of them alone, estimated 1.04 GiB)."""
    sizes = [sae_memory_bytes(cfg, d_in) for cfg in cfgs]
    return (stream_memory_bytes(cfgs[0], d_in, storage_bytes, train_rows) + sum(s for s, _ in sizes)
            + max(step for _, step in sizes))


@dataclass
class Group:
    """Points trained together from one pass of the loader, and their estimated memory (bytes)."""

    points: list[SweepPoint]
    memory_bytes: int
    data: TrainingData


def plan_groups(points: Sequence[SweepPoint], data: dict[tuple, TrainingData], max_memory_bytes: float) -> list[Group]:
    """Split ``points`` by stream (``data`` maps each :func:`stream_key` to its open stream), then
    pack each stream's points first-fit decreasing (largest estimate first) into groups within
    ``max_memory_bytes``; a point over the budget on its own gets a group of its own. Members keep
    sweep order; groups come in the order of their first point."""
    order = {p.id: i for i, p in enumerate(points)}
    groups: list[Group] = []
    for key, members in _by_stream(points).items():
        source = data[key]
        bins: list[list[SweepPoint]] = []
        for point in sorted(members, key=lambda p: -_memory(source, [p])):
            fit = next((b for b in bins if _memory(source, b + [point]) <= max_memory_bytes), None)
            if fit is None:
                bins.append([point])
            else:
                fit.append(point)
        groups += [Group(sorted(b, key=lambda p: order[p.id]), _memory(source, b), source) for b in bins]
    return sorted(groups, key=lambda g: order[g.points[0].id])


def _memory(source: TrainingData, points: list[SweepPoint]) -> int:
    return group_memory_bytes([p.cfg for p in points], source.d_in, TORCH_DTYPES[source.cache.dtype].itemsize,
                              source.rows_per_epoch)


def _by_stream(points: Sequence[SweepPoint]) -> dict[tuple, list[SweepPoint]]:
    streams: dict[tuple, list[SweepPoint]] = {}
    for point in points:
        streams.setdefault(stream_key(point.cfg), []).append(point)
    return streams


# ------------------------------------------------------------------------------------- running
@dataclass
class SweepResult:
    """What :func:`run_sweep` did: point ids trained, skipped (finished before) and failed (with
    the error), and the groups it trained them in."""

    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    groups: list[Group] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)  # being trained by another live run: left alone


def run_sweep(sweep: Sweep, *, max_memory_gb: float = DEFAULT_MAX_MEMORY_GB, only: Sequence[str] = (),
              dry_run: bool = False, progress: bool = True, scheduler: str | None = None,
              torch_threads: int | None = None) -> SweepResult:
    """Train the sweep's unfinished points in fused groups, interrupted ones resumed from their
    checkpoints where they can; skip finished ones (module docstring).

    Args:
        max_memory_gb: the memory budget of one group (GiB), see :func:`group_memory_bytes`.
        only: train only these point ids (all when empty).
        dry_run: print the plan (statuses and groups) and train nothing.
        scheduler: run each group as a task on this Dask distributed scheduler (``tcp://host:8786``)
            or, with ``"local"``, on a ``LocalCluster`` started for the sweep
            (:mod:`pipeline.distributed`); None trains the groups here, one after another.
        torch_threads: torch CPU threads of each group on the cluster (default: this process's
            ``torch.get_num_threads()``, so the weights equal a local run's bit for bit).

    Raises:
        ConfigError: ``only`` names an unknown point, ``max_memory_gb`` is not positive, a
            point's ``d_in`` disagrees with its cache (before anything trains), or the scheduler
            cannot be reached or ``distributed`` is not installed.
        CacheError: a cache is missing, incomplete, or lacks the hook (before anything trains).
        SAEWriteError: the disk filled (or the OS refused a write) while a point wrote a checkpoint
            or its SAE; its group stops, and a rerun resumes its points from their checkpoints.
    """
    if not max_memory_gb > 0:
        raise ConfigError(f"max_memory_gb must be a positive number of GiB, got {max_memory_gb}.")
    points = _select(sweep, only)
    data = _open_streams(points)
    with claimed_points(sweep, points, probe_only=dry_run) as elsewhere:
        statuses = {p.id: PointStatus("running", f"elsewhere: {elsewhere[p.id]}") if p.id in elsewhere else
                    point_status(sweep.folder(p), p.cfg, data[stream_key(p.cfg)].identity) for p in points}
        result = SweepResult(skipped=[p.id for p in points if statuses[p.id].kind == "finished"],
                             busy=list(elsewhere))
        todo = [_resuming(p, statuses[p.id]) for p in points if statuses[p.id].kind not in ("finished", "running")]
        result.groups = plan_groups(todo, data, max_memory_gb * GIB)
        _print_plan(sweep, points, statuses, result.groups, max_memory_gb)
        if dry_run:
            return result
        write_index(sweep)
        if scheduler is None:
            _train_here(sweep, result, progress)
        elif result.groups:
            _train_on_cluster(sweep, result, scheduler, torch_threads)
    busy = f", {len(result.busy)} left to the run training them" if result.busy else ""
    print(f"sweep {sweep.name!r}: {len(result.trained)} trained, {len(result.skipped)} skipped (finished), "
          f"{len(result.failed)} failed{busy}; folders under {sweep.output_path}")
    return result


def _resuming(point: SweepPoint, status: PointStatus) -> SweepPoint:
    """``point``, set to resume from ``status.resume_from`` when it names a checkpoint."""
    if status.resume_from is None:
        return point
    return replace(point, cfg=replace(point.cfg, resume_from_checkpoint=status.resume_from))


def write_index(sweep: Sweep) -> None:
    """``sweep.json``: the sweep's name, source file, current points and evaluation settings.

    Raises:
        SAEWriteError: the OS refuses the write (read-only or unwritable folder, full disk), before
            any point trains; the message names the folder, the OS error and the fix.
    """
    path = sweep.output_path / SWEEP_INDEX_FILENAME
    try:
        write_json(path, {
            "name": sweep.name, "source": sweep.source, "evaluate": sweep.evaluate,
            "points": [{"id": p.id, "params": p.params} for p in sweep.points]})
    except OSError as err:
        raise _folder_error(sweep, err, path) from None


def _folder_error(sweep: Sweep, err: OSError, path: Path) -> SAEWriteError:
    return SAEWriteError(f"cannot write the sweep folder {str(sweep.output_path)!r}: {describe_os_error(err, path)}. "
                         "Nothing was trained. Fix: make it writable, or set the sweep file's top-level "
                         "output_path to a folder on a writable filesystem, then rerun the same `sae-pipeline "
                         "sweep` command.")


@contextmanager
def claimed_points(sweep: Sweep, points: Sequence[SweepPoint], *, probe_only: bool = False
                   ) -> Iterator[dict[str, str]]:
    """Hold an exclusive ``flock`` on ``<output_path>/.<id>.lock`` for each point this run may
    train, so two runs of a sweep (or two DVC stages of one point) never train, reset or resume
    the same point folder at once. The kernel drops a flock when its holder dies, so a killed run
    leaves nothing to clean up.

    With ``probe_only`` (a dry run) nothing is created or written: only existing lock files are
    tried, and released at once.

    Yields:
        ``{point id: holder}`` of the points whose lock another live process holds (its pid and
        host, as it wrote them); this run leaves those points alone.

    Raises:
        SAEWriteError: the sweep folder cannot be written (:func:`write_index`'s message).
    """
    held, elsewhere = [], {}
    try:
        for point in points:
            lock = sweep.output_path / f".{point.id}.lock"
            if probe_only and not lock.exists():
                continue
            try:
                if not probe_only:
                    lock.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(lock, os.O_RDONLY if probe_only else os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise _folder_error(sweep, err, lock) from None
            held.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                elsewhere[point.id] = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                continue
            if not probe_only:
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        yield elsewhere
    finally:
        for fd in held:
            os.close(fd)


def _select(sweep: Sweep, only: Sequence[str]) -> list[SweepPoint]:
    ids = [p.id for p in sweep.points]
    for pid in only:
        if pid not in ids:
            close = difflib.get_close_matches(pid, ids, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"sweep {sweep.name!r} has no point {pid!r}.{hint} Run with --dry-run to list them.")
    return [p for p in sweep.points if not only or p.id in only]


def _open_streams(points: Sequence[SweepPoint]) -> dict[tuple, TrainingData]:
    """Open each stream's cache and check every point's d_in against it, before any training."""
    data: dict[tuple, TrainingData] = {}
    for point in points:
        key = stream_key(point.cfg)
        if key not in data:
            data[key] = TrainingData(point.cfg)
        try:
            data[key].check_d_in(point.cfg)
        except ConfigError as err:
            raise ConfigError(f"point {point.id}: {err}") from None
    return data


def _train_here(sweep: Sweep, result: SweepResult, progress: bool) -> None:
    for n, group in enumerate(result.groups, 1):
        print(f"group {n} of {len(result.groups)}: training {len(group.points)} SAEs")
        _clear_outcomes(sweep, group)
        _record(sweep, group, n, train_points([p.cfg for p in group.points], progress=progress), result)


def _train_on_cluster(sweep: Sweep, result: SweepResult, scheduler: str, torch_threads: int | None) -> None:
    from pipeline.distributed import train_on_cluster  # it imports this module (train_points) for its workers

    groups = result.groups
    for group in groups:
        _clear_outcomes(sweep, group)
    print(f"sending {len(groups)} group{'s' * (len(groups) != 1)} to the Dask scheduler {scheduler}")
    for i, records in train_on_cluster([[p.cfg for p in g.points] for g in groups], scheduler,
                                       torch_threads=torch_threads):
        print(f"group {i + 1} of {len(groups)}: returned from the cluster")
        _record(sweep, groups[i], i + 1, records, result)


def train_points(cfgs: list[TrainConfig], *, progress: bool = True) -> list[dict[str, Any]]:
    """Train one group (:func:`pipeline.training.train_group`) and return each point's outcome as
    plain data (it travels back from a Dask worker): ``{"status": "finished", "tokens_per_second",
    "tokens"}`` or ``{"status": "failed", "error": <one line>}``, in the order of ``cfgs``.

    Raises:
        ConfigError, CacheError: what :func:`pipeline.training.train_group` raises for the whole group.
    """
    records = []
    for outcome in train_group(cfgs, progress=progress):
        if isinstance(outcome, TrainResult):
            records.append({"status": "finished", "tokens_per_second": outcome.tokens_per_second,
                            "tokens": outcome.state.tokens_seen})
        else:
            records.append({"status": "failed", "error": _error_line(outcome)})
    return records


def _clear_outcomes(sweep: Sweep, group: Group) -> None:
    for point in group.points:
        (sweep.folder(point) / POINT_FILENAME).unlink(missing_ok=True)  # only the outcome below may say finished


def _record(sweep: Sweep, group: Group, n: int, records: list[dict[str, Any]], result: SweepResult) -> None:
    """Write each point's ``point.json`` (its outcome, group number and cache identity); update ``result``."""
    for point, outcome in zip(group.points, records):
        record = {"id": point.id, "params": point.params, "group": n, "cache": group.data.identity, **outcome}
        if outcome["status"] == "finished":
            result.trained.append(point.id)
        else:
            result.failed[point.id] = outcome["error"]
            print(f"FAILED {point.id}: {outcome['error']}")
        write_json(sweep.folder(point) / POINT_FILENAME, record)


def _error_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if isinstance(err, SaePipelineError) else f"{type(err).__name__}: {text}"


def _print_plan(sweep: Sweep, points: list[SweepPoint], statuses: dict[str, PointStatus], groups: list[Group],
                max_memory_gb: float) -> None:
    n_todo = sum(len(g.points) for g in groups)
    n_busy = sum(statuses[p.id].kind == "running" for p in points)
    busy = f"{n_busy} being trained by another run, " if n_busy else ""
    print(f"sweep {sweep.name!r}: {len(points)} points, {len(points) - n_todo - n_busy} finished (skipped), {busy}"
          f"{n_todo} to train "
          f"in {len(groups)} group{'s' * (len(groups) != 1)} (memory budget {max_memory_gb:g} GiB per group)")
    for p in points:
        status = statuses[p.id]
        if status.kind == "finished":
            print(f"  skip {p.id} (finished)")
        elif status.kind == "running":
            print(f"  skip {p.id} (being trained {status.detail})")
        elif status.kind != "new":
            print(f"  {'continue' if status.resume_from else 'retrain'} {p.id} ({status.kind}: {status.detail})")
    for n, group in enumerate(groups, 1):
        cfg = group.points[0].cfg
        print(f"  group {n}: {len(group.points)} SAEs, ~{group.memory_bytes / GIB:.2f} GiB, up to "
              f"{max(p.cfg.total_steps for p in group.points)} batches of {cfg.train_batch_size_tokens:,} tokens "
              f"from {cfg.cache_path} [{group.data.hook}], seed {cfg.seed}, {cfg.device}")
        if group.memory_bytes > max_memory_gb * GIB:
            print(f"    note: this point alone needs ~{group.memory_bytes / GIB:.2f} GiB, over the budget; "
                  "it trains by itself (raise --max-memory-gb if it runs out of memory)")
        for p in group.points:
            resume = f": {statuses[p.id].detail}" if statuses[p.id].resume_from else ""
            print(f"    {p.id} ({statuses[p.id].kind}{resume})")
