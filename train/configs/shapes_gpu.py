# Launch (the bundled checkpoints/default was made with this config; README "The bundled model"):
#   python train/vq_tokenizer.py --device cuda --batch-size 64 --steps 6000 --out checkpoints/vq
#   python train/multitask.py --config train/configs/shapes_gpu.py --time-limit 7 --vq checkpoints/vq
#   python -m ofa_unified convert runs/shapes_gpu/model --out checkpoints/default --dtype float16
"""The default recipe on one GPU: the `shapes` model, a fresh scene per sample, batch 128."""

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
    num_workers=14,  # the data workers, not the GPU, set the pace (bench/README.md)
    out_dir="runs/shapes_gpu",
)
