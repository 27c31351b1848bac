# Launch (50 minutes of training on the 2-core CPU, fine-tuned from the bundled model):
#   python train/multitask.py --config train/configs/shapes_retrieval.py
"""The bundled model made a dual encoder too (VLMo): modality experts in its encoder, a retrieval
head trained by image-text contrast (`itc`), and SimVLM's PrefixLM beside the default task mix.

- `modality_experts`, `fusion_layers=2`: in each of the 4 encoder layers patches run a vision expert
  and text the layer's own FFN (the language expert); in the top 2 an input with both runs a
  vision-language expert. The experts start as copies of the checkpoint's FFNs, so training starts
  from its exact outputs; an image alone or a text alone runs only its own expert (`OFAModel.embed`).
- `itc_dim=128`: the retrieval head (fresh), trained on the in-batch pairs of each micro-batch
  (about 13 of 32 samples at these weights).
- `prefix_lm`: a caption cut at a random word, the decoder writes the rest; half its records show
  the image, half are text alone.
"""

from train.configs.shapes import DEFAULT_TASKS, TrainConfig
from train.configs.shapes_reads_image import config as reads_image

config = TrainConfig(
    init="checkpoints/default",
    vq="checkpoints/default/vq",
    vocab="checkpoints/default",
    model_overrides={
        **reads_image.model_overrides,
        "modality_experts": True,
        "fusion_layers": 2,
        "itc_dim": 128,
    },
    tasks={**DEFAULT_TASKS, "itc": 10.0, "prefix_lm": 1.0},
    max_steps=2400,
    lr=3e-4,
    warmup_steps=50,
    time_limit=50.0,
    eval_interval=600,
    eval_samples=128,
    eval_generate=0,
    save_interval=600,
    out_dir="runs/retrieval",
)
