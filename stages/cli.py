"""The ``sae-pipeline`` command group. Documented errors print as one line, without a traceback."""

from __future__ import annotations

import sys
import warnings

import click

from pipeline import __version__
from pipeline.errors import SaePipelineError
from stages import cache, evaluate, harvest, run_all, train


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sae-pipeline")
def cli():
    """Harvest language-model activations into a Zarr cache once; train and evaluate SAEs from it."""


for _cmd in (harvest.command, train.command, evaluate.command, run_all.command, cache.command):
    cli.add_command(_cmd)


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> None:
    warnings.formatwarning = _format_warning  # config warnings are for users, not source locations
    try:
        cli.main(args=argv, standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("\ninterrupted: what was written is kept. Re-running an interrupted harvest resumes it; "
                   "an interrupted training continues from its last checkpoint with --resume (train with "
                   "--n-checkpoints N to have some) or restarts with --overwrite.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except SaePipelineError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
