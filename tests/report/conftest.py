"""One chain of real stage runs on the tiny model (sft → label → rm → ppo → eval, as in test_pipeline), run
once for the package, and checks of what it wrote."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rlhf_pipeline.pipeline import run_pipeline
from tests.test_pipeline import _chain

STAGES = ("sft", "label", "rm", "ppo", "eval")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="package")
def chain(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny pipeline, run once; returns its folder (outputs in outputs/<stage>)."""
    root = tmp_path_factory.mktemp("chain")
    run_pipeline(_chain(root, tiny_model_dir))
    return root


def metrics_of(chain: Path, stage: str) -> dict[str, Any]:
    return json.loads((chain / "outputs" / stage / "metrics.json").read_text())


def finite(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def check_png(path: Path) -> None:
    """A real image: PNG signature, more than 5 kB, and more than a handful of distinct colours."""
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5_000, (path, len(data))
    pixels = (imread(path) * 255).round().astype(np.int64)
    channels = pixels.shape[-1]
    colours = np.unique(pixels.reshape(-1, channels) @ (256 ** np.arange(channels)))  # one code per colour
    assert len(colours) > 20, (path, len(colours))
