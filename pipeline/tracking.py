"""Training metrics out: a JSON-lines log always, Weights & Biases when asked.

``metrics.jsonl`` gets one record every ``log_every`` steps with our flat names (``mse_loss``,
``l0``, ``explained_variance``, ``dead_features``, ...). W&B gets the same numbers every
``wandb_log_frequency`` steps under the names SAELens logs (``losses/mse_loss``, ``metrics/l0``,
``metrics/explained_variance``, ``sparsity/dead_features``, ...), so dashboards built for SAELens
runs read ours. With no network W&B runs in offline mode (``wandb sync`` uploads it later).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

# our record key → SAELens's W&B key (sae_lens/training/sae_trainer.py, 6.54.12)
SAELENS_NAMES = {
    "loss": "losses/overall_loss",
    "mse_loss": "losses/mse_loss",
    "aux_loss": "losses/auxiliary_reconstruction_loss",
    "l0": "metrics/l0",
    "explained_variance": "metrics/explained_variance",
    "dead_features": "sparsity/dead_features",
    "dense_features": "sparsity/dense_features",
    "mean_passes_since_fired": "sparsity/mean_passes_since_fired",
    "below_1e-5": "sparsity/below_1e-5",
    "below_1e-6": "sparsity/below_1e-6",
    "mean_log10_feature_sparsity": "metrics/mean_log10_feature_sparsity",
    "lr": "details/current_learning_rate",
    "tokens": "details/n_training_tokens",
    "sparsity_coefficient": "details/sparsity_coefficient",
    "tokens_per_second": "details/tokens_per_second",
}


def saelens_names(record: dict[str, Any], sparsity_loss_name: str) -> dict[str, Any]:
    """``record`` renamed for W&B: known keys as in ``SAELENS_NAMES``, ``sparsity_loss`` as
    ``losses/<sparsity_loss_name>`` (``l1_loss`` or ``l0_loss``), other losses under ``losses/``
    and anything else under ``metrics/``; ``step`` is dropped (passed to W&B separately)."""
    out = {}
    for key, value in record.items():
        if key == "step":
            continue
        if key == "sparsity_loss":
            out[f"losses/{sparsity_loss_name}"] = value
        elif key in SAELENS_NAMES:
            out[SAELENS_NAMES[key]] = value
        else:
            out[("losses/" if key.endswith("_loss") or "_loss_" in key else "metrics/") + key] = value
    return out


def network_reachable(host: str = "api.wandb.ai", port: int = 443, timeout: float = 1.5) -> bool:
    """True when a TCP connection to ``host:port`` opens within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class MetricsLogger:
    """Writes step records to ``path`` (JSON lines) and, when ``wandb_run_args`` is given, to W&B.

    Args:
        path: the ``metrics.jsonl`` file; opened for append, so a resumed run continues it
            (:meth:`truncate_after` first drops records past the checkpoint).
        sparsity_loss_name: SAELens's name for this architecture's sparsity loss.
        wandb_run_args: keyword arguments for ``wandb.init`` (project, entity, name, config, dir);
            None disables W&B.

    Raises:
        ConfigError: W&B was asked for but the ``wandb`` package is not installed.
    """

    def __init__(self, path: Path, sparsity_loss_name: str = "l1_loss",
                 wandb_run_args: dict[str, Any] | None = None):
        self.path = Path(path)
        self.sparsity_loss_name = sparsity_loss_name
        self.file = open(self.path, "a")
        self.wandb_run = _start_wandb(wandb_run_args) if wandb_run_args is not None else None

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (JSON-ready scalars) to the JSON-lines log and flush."""
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def to_wandb(self, record: dict[str, Any]) -> None:
        """Send ``record`` to W&B under SAELens's names (no-op without a run)."""
        if self.wandb_run is not None:
            self.wandb_run.log(saelens_names(record, self.sparsity_loss_name), step=record["step"])

    def close(self) -> None:
        """Close the log file and finish the W&B run (flushes an offline run to disk)."""
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()

    @staticmethod
    def truncate_after(path: Path, step: int) -> None:
        """Drop records of ``path`` whose ``step`` exceeds ``step`` (before resuming from it)."""
        if not Path(path).exists():
            return
        kept = [line for line in Path(path).read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        Path(path).write_text("".join(line + "\n" for line in kept))


def _start_wandb(run_args: dict[str, Any]):
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            "log_to_wandb is true but the wandb package is not installed; "
            "pip install 'sae-pipeline[wandb]' (or set log_to_wandb: false)."
        ) from None
    mode = os.environ.get("WANDB_MODE") or ("online" if network_reachable() else "offline")
    if mode == "offline":
        print("note: W&B runs offline (no network); upload later with `wandb sync`.")
    try:
        return wandb.init(mode=mode, **run_args)
    except Exception as err:  # wandb raises UsageError/CommError without a login or a server
        raise ConfigError(
            f"W&B could not start a {mode} run ({type(err).__name__}: {err}); run `wandb login`, "
            "or set WANDB_MODE=offline, or drop --log-to-wandb."
        ) from None
