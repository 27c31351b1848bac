# Launch (the bundled checkpoints/default; one H100, ~8 minutes; the data workers set the pace):
#   python train/vq_tokenizer.py --device cuda --batch-size 64 --steps 8000 --out checkpoints/vq
#   python train/multitask.py --config train/configs/shapes_gpu.py
#   python -m ofa_unified convert runs/shapes_gpu/model --out checkpoints/default --dtype float16
"""The default recipe on one GPU: the `shapes` model, a fresh scene per sample, ~1M samples."""

from train.configs.shapes import TrainConfig

config = TrainConfig(
    batch_size=128,
    max_steps=6000,
    lr=1.5e-3,
    warmup_steps=300,
    eval_interval=0,  # only at the end: evaluation pauses the data workers' output
    eval_samples=512,
    eval_generate=32,
    save_interval=1000,
    log_interval=50,
    num_workers=14,  # rendering + preprocessing run ~130 samples/s per core
    out_dir="runs/shapes_gpu",
)
