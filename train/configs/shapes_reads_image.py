# Launch (the bundled model's recipe; 85 minutes of training on the 2-core CPU, from scratch):
#   python train/multitask.py --config train/configs/shapes_reads_image.py
# One GPU (same recipe, ~4x the samples, bf16 autocast; not run yet: no GPU was lent):
#   python train/multitask.py --config train/configs/shapes_reads_image.py --batch-size 64 --lr 1.5e-3 \
#       --max-steps 9000 --time-limit 0 --threads 0 --num-workers 8 --out-dir runs/reads_image_gpu
"""The bundled model: the `shapes` size with the options the binding ladder found make it read the
image (bench/README.md, "The binding ladder"), trained from scratch on the whole task mix.

- No absolute position bias in the decoder's cross-attention (`cross_pos_bias=False`), no NormFormer
  LayerNorms, no patch LayerNorm, head_dim^-0.5 attention scale: with OFA's pieces the decoder's
  cross-attention locks onto fixed patches before it can read any, and one-object colour questions
  stay near chance.
- Each patch's position is added to its content (`image_pos_content`), so box coordinates can be
  read off the patch that holds the object.
- Image outputs (infilling, text-to-image) run on their own FFN experts, which alone read the image's
  VQ codes (`image_expert`, `image_tokens`); text tasks compute on the shared weights only.
"""

from train.configs.shapes import TrainConfig

READS_IMAGE = {
    "cross_pos_bias": False,
    "normformer": False,
    "patch_layernorm": False,
    "attention_scale": "head_dim",
    "image_pos_content": True,
}

config = TrainConfig(
    vocab="checkpoints/default",
    vq="checkpoints/default/vq",
    model_overrides={"dropout": 0.0, "image_expert": True, "image_tokens": True, **READS_IMAGE},
    max_steps=4400,
    warmup_steps=150,
    time_limit=85.0,
    eval_interval=600,
    eval_samples=96,
    eval_generate=0,
    save_interval=600,
    out_dir="runs/reads_image",
)
