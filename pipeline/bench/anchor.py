"""The end-to-end anchor run of issue 2: harvest → train → evaluate on the ANCHORS.md setup.

    python -m pipeline.bench.anchor [--config configs/anchor_wikitext.yaml] [--out bench.json]

Prints harvest tokens/s, stored bytes/token, training tokens/s and the held-out explained variance,
L0, CE loss recovered and dead fraction, beside SAELens 6.54.12's figures for the same setup as
recorded in ../shared/ANCHORS.md (a 2-core machine like CI's; compare ratios, machines are noisy).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from pipeline.config import EvalConfig, HarvestConfig, TrainConfig
from pipeline.evaluate import evaluate
from pipeline.harvest import harvest
from pipeline.training import train

# ../shared/ANCHORS.md, "End-to-end with SAELens" (SAELens 6.54.12, 2 cores, torch 2.13 CPU).
SAELENS_REFERENCE = {
    "harvest_tokens_per_second": 2100.0,
    "bytes_per_token": 2312.0,
    "train_tokens_per_second": 3100.0,
    "explained_variance": 0.812,
    "l0": 32.0,
    "ce_loss_recovered": 0.881,
}


def _section(path: str, name: str) -> dict:
    import yaml

    return yaml.safe_load(Path(path).read_text())[name]


@click.command()
@click.option("--config", "config_path", default="configs/anchor_wikitext.yaml", show_default=True)
@click.option("--out", default=None, help="Also write the figures as JSON here.")
def main(config_path: str, out: str | None) -> None:
    h_cfg = HarvestConfig.from_dict({**_section(config_path, "harvest"), "overwrite": True})
    t_cfg = TrainConfig.from_dict({**_section(config_path, "train"), "overwrite": True})
    e_cfg = EvalConfig.from_dict(_section(config_path, "evaluate"))
    t0 = time.perf_counter()
    h = harvest(h_cfg)
    t = train(t_cfg)
    m = evaluate(e_cfg)
    ours = {
        "harvest_tokens_per_second": h.tokens_per_second,
        "bytes_per_token": h.bytes_per_token,
        "train_tokens_per_second": t.tokens_per_second,
        **{k: m[k] for k in ("explained_variance", "l0", "ce_loss_recovered", "dead_fraction",
                             "ce_loss_clean", "ce_loss_with_sae", "ce_loss_zero_ablation") if k in m},
        "wall_seconds": time.perf_counter() - t0,
    }
    click.echo(f"{'figure':<28}{'sae-pipeline':>14}{'SAELens (ANCHORS.md)':>24}")
    for key, value in ours.items():
        ref = SAELENS_REFERENCE.get(key)
        click.echo(f"{key:<28}{value:>14.4g}{'' if ref is None else f'{ref:>24.4g}'}")
    if out:
        Path(out).write_text(json.dumps({"sae_pipeline": ours, "saelens_reference": SAELENS_REFERENCE}, indent=2))


if __name__ == "__main__":
    main()
