# Launch (the default config; ~45 minutes on 2 CPU cores):
#   python train/multitask.py
#   python train/multitask.py --config train/configs/shapes.py --out runs/shapes --max-steps 2400
# Any field is a flag (`--batch-size 16`, `--tasks caption=1,vqa=2`) or `--set key=value`.
"""Default training config: the `shapes` model on the procedurally generated shapes world.

Other configs import `TrainConfig` and set `config = TrainConfig(...)` (see `micro.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Harder tasks get more samples: detection (long box+label sequences), grounding (exact bins) and
# captioning; yes/no tasks and text infilling are learned quickly. Image outputs are 64 codes each
# (8x8 grid), the costliest targets, and are kept small in the mix.
DEFAULT_TASKS = {
    "detection": 3.0,
    "grounding": 2.5,
    "caption": 2.0,
    "vqa": 2.0,
    "grounded_caption": 1.0,
    "itm": 1.0,
    "visual_entailment": 1.0,
    "text_infilling": 0.5,
    "image_infilling": 0.5,
    "text_to_image": 0.5,
    # BEiT's masked image modeling (blocks of encoder patches blanked, their VQ codes predicted): an
    # option, off by default; give it a weight (`--tasks ...,masked_image_modeling=0.5`) to mix it in.
    "masked_image_modeling": 0.0,
}


@dataclass
class TrainConfig:
    # --- model
    model: str = "shapes"  # a named size in ofa_unified/model_configs
    # OFAConfig fields on top of the size. Every sample is a fresh scene, so the model never sees an
    # image twice and dropout only slows a CPU-sized run down.
    model_overrides: dict[str, Any] = field(default_factory=lambda: {"dropout": 0.0})
    init: str | None = None  # fine-tune from a checkpoint (own / HF-port / fairseq); keeps its vocabulary
    stem: str | None = None  # a pretrained image stem (train/stem.py) loaded over the model's ResNet
    freeze_stem: bool = False  # keep the ResNet's weights and BatchNorm statistics fixed
    # A regex: train only the parameters whose names match it (e.g. model.IMAGE_OUTPUT_PARAMS); the
    # rest, and the BatchNorm statistics of a stem left without trainable weights, stay fixed.
    train_only: str | None = None
    # --- vocabulary
    vocab: str | None = None  # a Vocab directory; None: SentencePiece trained on shapes-world text
    vocab_size: int = 512  # SentencePiece pieces incl. 4 specials and 256 byte-fallback pieces
    vocab_scenes: int = 2000  # train scenes whose texts (plus the templates) train the SentencePiece
    num_bins: int = 128  # one bin per pixel at 128 px
    num_codes: int = 256  # image codes when no VQ tokenizer is loaded (else the tokenizer's K)
    vq: str | None = "auto"  # VQ tokenizer dir; "auto": checkpoints/vq if it exists; None: no image outputs
    # --- data
    tasks: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TASKS))  # task -> sampling weight
    # source -> weight: "shapes" (the generated world) or a reader spec such as "jsonl:train.jsonl"
    data: dict[str, float] = field(default_factory=lambda: {"shapes": 1.0})
    train_scenes: int | None = None  # None: a fresh scene per sample; N: cycle over N scenes
    scene_size: int = 128  # rendered shapes-world image side
    augment: bool = False  # photometric jitter (no flips/crops: they would break left/right and boxes)
    # --- optimisation
    max_steps: int = 2400
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_steps: int = 150
    schedule: str = "cosine"  # linear warmup, then "cosine" or "linear" decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01  # on matrices only (not biases, norms)
    label_smoothing: float = 0.1
    # "token": every target token weighs the same (OFA/fairseq), so a task's share of the gradient is
    # its weight times its target length: in the default mix VQA gets ~2% and ITM ~1% of it, detection
    # and the 64-code image tasks ~70%. "sample": each sample's token mean, so the mix weights alone
    # set each task's share (docs/experiments.md, 2026-12-03).
    loss_normalization: str = "token"
    clip_grad: float = 1.0  # max global grad norm (0 = off)
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32" or "bf16"
    # --- evaluation, logging, checkpoints
    eval_interval: int = 600  # steps between evaluations (0 = only at the end)
    eval_data: str = "shapes"  # "shapes" (the val split) or a reader spec such as jsonl:val.jsonl
    eval_samples: int = 128  # samples for the validation loss
    eval_generate: int = 16  # samples per task for the greedy-decoding metrics (0 = off)
    log_interval: int = 10  # steps between metrics.jsonl lines
    save_interval: int = 600  # steps between checkpoints (the last step always saves)
    out_dir: str = "runs/shapes"
    seed: int = 0
    device: str = "auto"  # "auto": cuda if available, else cpu
    threads: int = 2  # torch CPU threads in the main process (0 = torch's default)
    num_workers: int = 1  # DataLoader worker processes (rendering, preprocessing, VQ targets)
    # "auto": continue when out_dir holds train_state.pt; "yes": require it; "no": start over
    resume: str = "auto"
    stop_after: int = 0  # save and stop at this step (split a run; tests use it to simulate a kill)
    # minutes of training after which the run evaluates, saves and stops (0 = off); resumable later
    time_limit: float = 0.0
    progress: bool = True  # tqdm bar


config = TrainConfig()
