"""``sae-pipeline run``: the main job, harvest → train → evaluate, on one config file."""

from __future__ import annotations

import click

from pipeline.config import EvalConfig, HarvestConfig, TrainConfig
from stages import evaluate, harvest, train
from stages.common import load_config


@click.command("run")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML with harvest/train/evaluate sections (default: the embedded offline default: "
                   "SmolLM2-135M, Shakespeare, TopK k=32 d_sae=4608).")
@click.option("--overwrite", is_flag=True, default=None,
              help="Retrain the SAE if its folder already holds one (a complete identical cache is reused).")
def command(config_path, overwrite):
    """Run the whole pipeline; each stage resumes or refuses as when run alone."""
    h = harvest.run(load_config(HarvestConfig, "harvest", config_path, {}))
    t_cfg = load_config(TrainConfig, "train", config_path, {"overwrite": overwrite})
    if config_path is None:
        t_cfg.cache_path = str(h.cache.path)
    t = train.run(t_cfg)
    evaluate.run(load_config(EvalConfig, "evaluate", config_path, {"sae_path": str(t.output_path)}))
