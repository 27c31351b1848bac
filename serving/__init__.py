"""HTTP serving for ofa-unified: `python -m serving`, or `build_app(config, predictor)` in code."""

from serving.app import build_app
from serving.config import ServeConfig

__all__ = ["ServeConfig", "build_app"]
