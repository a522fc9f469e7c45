"""Config loading shared by the stage commands: YAML file (optionally sectioned) + flag overrides."""

from __future__ import annotations

import difflib
from typing import Any

import click
import yaml

from pipeline.config import _Config, read_yaml_mapping
from pipeline.errors import ConfigError


SECTIONS = ("harvest", "train", "evaluate")


def parse_sets(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``("l1_coefficient=5", "hook_names=[a,b]")`` → dict, values parsed as YAML scalars/lists."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects field=value, got {pair!r}.")
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key.strip()] = value  # a plain string; the config's own checks judge it
    return out


def load_config(cls: type[_Config], section: str, path: str | None, overrides: dict[str, Any]):
    """Build a ``cls`` from ``path`` (its ``section`` mapping if the file has sections) plus overrides.

    Raises:
        ConfigError: unreadable file, or a sectioned file with an unknown section (misspelled).
    """
    data: dict[str, Any] = {}
    if path:
        raw = read_yaml_mapping(path)
        if any(key in raw for key in SECTIONS):
            unknown = [key for key in raw if key not in SECTIONS]
            if unknown:
                close = difflib.get_close_matches(unknown[0], SECTIONS, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"config file {path!r} has unknown section {unknown[0]!r}.{hint} "
                                  f"Sections: {', '.join(SECTIONS)}.")
            data = dict(raw.get(section) or {})
        else:
            data = dict(raw)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return cls.from_dict(data)


def config_options(f):
    """``--config FILE`` and repeatable ``--set field=value`` on every stage command."""
    f = click.option("--set", "sets", multiple=True, metavar="FIELD=VALUE",
                     help="Override any config field (repeatable), e.g. --set lr=3e-4.")(f)
    f = click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                     help="YAML config; a file with harvest/train/evaluate sections gives this stage's.")(f)
    return f


def field_option(cls: type[_Config], name: str, help: str = "", **kwargs):
    """``--name-with-dashes`` for config field ``name``; its help shows the config's default."""
    default = getattr(cls(), name)
    if "type" not in kwargs and isinstance(default, (int, float)) and not isinstance(default, bool):
        kwargs["type"] = type(default)
    shown = ",".join(default) if isinstance(default, list) else default
    suffix = "" if default is None else f" [default: {shown}]"
    return click.option("--" + name.replace("_", "-"), name, default=None, help=help + suffix, **kwargs)
