"""Config loading shared by the stage commands: YAML file (optionally sectioned) + flag overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import yaml

from pipeline.config import _Config
from pipeline.errors import ConfigError


SECTIONS = ("harvest", "train", "evaluate")


def parse_sets(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``("l1_coefficient=5", "hook_names=[a,b]")`` → dict, values parsed as YAML scalars/lists."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects field=value, got {pair!r}.")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def load_config(cls: type[_Config], section: str, path: str | None, overrides: dict[str, Any]):
    """Build a ``cls`` from ``path`` (its ``section`` mapping if the file has one) plus overrides."""
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path!r} does not exist.")
        raw = yaml.safe_load(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping.")
        sectioned = any(key in raw for key in SECTIONS)
        data = dict((raw.get(section) or {}) if sectioned else raw)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return cls.from_dict(data)


def config_options(f):
    """``--config FILE`` and repeatable ``--set field=value`` on every stage command."""
    f = click.option("--set", "sets", multiple=True, metavar="FIELD=VALUE",
                     help="Override any config field (repeatable), e.g. --set lr=3e-4.")(f)
    f = click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                     help="YAML config; a file with harvest/train/evaluate sections gives this stage's.")(f)
    return f
