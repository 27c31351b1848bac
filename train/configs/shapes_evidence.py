# Launch (25 minutes of training on the 2-core CPU, fine-tuned from the bundled model):
#   python train/multitask.py --config train/configs/shapes_evidence.py
"""The bundled model taught to write the evidence before each verdict (`answer_evidence`): ITM,
existence and relation answers become "small circles: blue answer: no". The weights are the
checkpoint's (the option adds none), so the first step is the bundled model's exact computation;
ITM and VQA are sampled twice as often as in the default mix, the other tasks keep theirs so what
the model reads already is kept.
"""

from train.configs.shapes import DEFAULT_TASKS, TrainConfig

config = TrainConfig(
    init="checkpoints/default",
    vq="checkpoints/default/vq",
    vocab="checkpoints/default",
    model_overrides={"answer_evidence": True},
    tasks={**DEFAULT_TASKS, "itm": 2.0, "vqa": 4.0},
    max_steps=1500,
    lr=3e-4,
    warmup_steps=50,
    time_limit=25.0,
    eval_interval=300,
    eval_samples=128,
    eval_generate=0,
    save_interval=300,
    out_dir="runs/evidence",
)
