# Launch (~100 minutes on the 2-core CPU, after pretraining the stem for ~12 minutes):
#   python train/stem.py --model shapes --steps 1500 --out runs/stem
#   python train/multitask.py --config train/configs/shapes_stem.py --vq checkpoints/default/vq
# Measured 2026-11-25 (CPU, 100 min, 5819 steps x 32 = 186k samples): worse than the bundled
# model on every task (bench/results/eval_pretrained_stem_cpu.json; README "The bundled model").
# Again 2026-11-26 with the new Xavier init (88 min, --max-steps 4800, 4451 steps, 142k samples):
# better captions, grounding and detection than the 2026-11-25 run, still below the bundled model
# (bench/results/eval_xavier_stem_cpu.json).
"""The `shapes` model on a pretrained, frozen image stem, with image positions added to the patch content.

The stem (train/stem.py) already tells colour, shape and size apart in every stride-16 cell;
freezing it keeps colour from being trained away (it was, end to end: bench/README.md) and saves
the stem's backward pass. Positions enter the patch content (`image_pos_content`) so box
coordinates need not be inferred from the stem's zero padding. In neither run did the transformer
learn to read colour from the stem within the budget (VQA/ITM losses unchanged with a swapped image).
"""

from train.configs.shapes import TrainConfig

config = TrainConfig(
    model_overrides={"dropout": 0.0, "image_pos_content": True},
    stem="runs/stem",
    freeze_stem=True,
    max_steps=6000,
    eval_interval=1000,
    save_interval=500,
    out_dir="runs/shapes_stem",
)
