# Launch (a smoke run in well under a minute on CPU):
#   python train/multitask.py --config train/configs/micro.py
"""Tiny local mode: the `micro` model on a handful of shapes scenes, for checking the recipe end to end."""

from train.configs.shapes import TrainConfig

config = TrainConfig(
    model="micro",
    vocab_size=320,
    vocab_scenes=50,
    num_bins=32,
    num_codes=64,
    vq=None,
    tasks={"caption": 1.0, "vqa": 1.0, "grounding": 1.0, "detection": 1.0, "itm": 1.0},
    train_scenes=32,
    max_steps=40,
    batch_size=8,
    lr=3e-3,
    warmup_steps=5,
    eval_interval=20,
    eval_samples=16,
    eval_generate=4,
    log_interval=5,
    save_interval=20,
    out_dir="runs/micro",
    num_workers=0,
)
