# Launch (85 minutes of training on the 2-core CPU, from scratch):
#   python train/multitask.py --config train/configs/shapes_sample_loss.py
# One GPU (same recipe, ~4x the samples, bf16 autocast; not run yet: no GPU was lent):
#   python train/multitask.py --config train/configs/shapes_sample_loss.py --batch-size 64 --lr 1.5e-3 \
#       --max-steps 9000 --time-limit 0 --threads 0 --num-workers 8 --out-dir runs/sample_loss_gpu
"""`shapes_reads_image.py` with one change: each sample's loss is its token mean
(`loss_normalization="sample"`), so a task's share of the gradient is its weight in the mix rather
than its weight times its answer's length (VQA, ITM and entailment answer in two tokens, detection in
~21, the image tasks in 65)."""

from dataclasses import replace

from train.configs.shapes_reads_image import config as reads_image

config = replace(reads_image, loss_normalization="sample", out_dir="runs/sample_loss")
