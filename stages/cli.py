"""The ``sae-pipeline`` command group. Documented errors print as one line, without a traceback."""

from __future__ import annotations

import importlib
import sys
import warnings

import click

from pipeline import __version__
from pipeline.errors import SaePipelineError

# command name -> stages module defining ``command``. Imported only when that command runs (the
# model libraries take seconds to import, and sweep/report/cache rarely need them).
COMMANDS = {
    "harvest": "harvest", "train": "train", "sweep": "sweep", "evaluate": "evaluate", "report": "report",
    "run": "run_all", "cache": "cache",
    # analysis of a trained SAE
    "features": "features", "max-examples": "max_examples", "steer": "steer", "attribute": "attribute",
    "dashboard": "dashboard",
    # measuring against SAELens
    "bench": "bench",
}


class LazyGroup(click.Group):
    """A click group that imports a subcommand's module on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        return importlib.import_module(f"stages.{COMMANDS[cmd_name]}").command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sae-pipeline")
def cli():
    """Harvest language-model activations into a Zarr cache once; train and evaluate SAEs from it."""


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> None:
    warnings.formatwarning = _format_warning  # config warnings are for users, not source locations
    try:
        cli.main(args=argv, standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("\ninterrupted: what was written is kept. Re-running an interrupted harvest resumes it; "
                   "an interrupted training continues from its last checkpoint with --resume (train with "
                   "--n-checkpoints N to have some) or restarts with --overwrite; re-running an interrupted "
                   "sweep keeps its finished points, resumes interrupted ones from their last checkpoint and "
                   "retrains the rest.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except SaePipelineError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
