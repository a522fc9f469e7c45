"""Evaluation plumbing: bad output paths are refused before any work (metrics are tested in
test_evals; the real-model evaluation in test_end_to_end)."""

from __future__ import annotations

import pytest

from pipeline.config import EvalConfig
from pipeline.errors import ConfigError
from pipeline.evaluate import evaluate


def test_metrics_path_that_is_a_folder_or_under_a_file_is_refused_up_front(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a folder"):
        evaluate(EvalConfig(sae_path=str(tmp_path / "no-sae"), output_path=str(tmp_path)))
    with pytest.raises(ConfigError, match="lies under the file"):
        evaluate(EvalConfig(sae_path=str(tmp_path / "no-sae"), output_path=str(tmp_path / "afile" / "m.json")))
