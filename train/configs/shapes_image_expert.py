# Launch (~75 minutes on the 2-core CPU), from the bundled model:
#   python train/multitask.py --config train/configs/shapes_image_expert.py
"""Image outputs on their own FFN experts (`image_expert`), fine-tuned from the bundled model.

Only the parameters that image-output rows alone use train (`model.IMAGE_OUTPUT_PARAMS`: the
experts, the `image_tokens` projection and the decoder's code-only embeddings and tables), so every
text task computes exactly what the bundled model did, and the mix holds image outputs only. The
experts start as copies of the shared FFNs; `image_tokens` gives them the visible image's VQ codes,
which carry the colours the stem drops (bench/README.md, "Images as tokens on the input side").
"""

from ofa_unified.model import IMAGE_OUTPUT_PARAMS
from train.configs.shapes import TrainConfig

config = TrainConfig(
    init="checkpoints/default",
    vq="checkpoints/default/vq",
    model_overrides={"dropout": 0.0, "image_expert": True, "image_tokens": True},
    train_only=IMAGE_OUTPUT_PARAMS,
    tasks={"image_infilling": 8.0, "text_to_image": 1.0, "masked_image_modeling": 0.5},
    max_steps=3600,
    warmup_steps=30,
    time_limit=75.0,
    eval_interval=0,
    eval_samples=64,
    eval_generate=0,
    save_interval=400,
    out_dir="runs/image_expert",
)
