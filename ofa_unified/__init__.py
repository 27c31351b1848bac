"""ofa-unified: one encoder-decoder for every vision-language task, everything a token."""

import os

# Idle OpenMP threads that spin starve everything else on a small shared CPU (measured 2-5 samples/s
# training instead of 20-35 on 2 busy cores). Effective only when set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ofa_unified.checkpoint import Loaded, load_checkpoint, save_checkpoint
from ofa_unified.model import OFAConfig, OFAModel, build_model, list_models, model_config
from ofa_unified.vocab import Vocab


def from_pretrained(path: str, device: str = "cpu") -> Loaded:
    """Load a project checkpoint, an HF-port OFA directory or a fairseq `.pt` (format detected)."""
    return load_checkpoint(path, device=device)


__all__ = [
    "Loaded",
    "OFAConfig",
    "OFAModel",
    "Vocab",
    "build_model",
    "from_pretrained",
    "list_models",
    "load_checkpoint",
    "model_config",
    "save_checkpoint",
]
