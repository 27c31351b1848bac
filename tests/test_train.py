import json
import logging
import math
import re
from itertools import pairwise
from pathlib import Path

import pytest
import torch

from ofa_unified import Vocab, build_model, load_checkpoint, save_checkpoint
from ofa_unified.data import shapes
from ofa_unified.data.pipeline import build_shapes_vocab

multitask = pytest.importorskip("train.multitask")

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "train" / "configs").glob("*.py"))


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab")
    build_shapes_vocab(path, 320, num_codes=16, num_bins=32, num_scenes=30)
    return path


def micro_args(out, vocab_dir, *extra):
    """A micro model memorising 4 scenes: high lr, no dropout, per-step logs, no evaluation."""
    return [
        "--config", "train/configs/micro.py", "--out", str(out), "--vocab", str(vocab_dir),
        "--tasks", "caption=1,vqa=1,grounding=1", "--train-scenes", "4", "--batch-size", "4",
        "--max-steps", "20", "--lr", "5e-3", "--warmup-steps", "2", "--model-overrides", "dropout=0",
        "--log-interval", "1", "--eval-interval", "0", "--eval-samples", "0", "--eval-generate", "0",
        "--num-workers", "0", "--no-progress", "--threads", "1", *extra,
    ]  # fmt: skip


def logged_losses(out: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in lines if "loss" in x]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {x["step"]: x["loss"] for x in lines if "loss" in x}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_loads(path):
    cfg = multitask.load_config(path)
    multitask.check_config(cfg)
    assert path.read_text().startswith("# Launch")


def test_cli_overrides_parse():
    cfg = multitask.parse_config(
        [
            "--out", "runs/x", "--max-steps", "7", "--device", "cpu", "--batch-size", "3", "--lr", "2e-4",
            "--model", "micro", "--tasks", "caption=1,vqa=2", "--data", "shapes",
            "--data", "jsonl:a.jsonl@0.5", "--model-overrides", "dropout=0.0,code_grid_size=4",
            "--betas", "0.9,0.95", "--no-augment", "--vq", "none", "--train-scenes", "100",
            "--set", "grad_accum=2", "--set", "init=none", "--resume",
        ]
    )  # fmt: skip
    assert (cfg.out_dir, cfg.max_steps, cfg.device, cfg.batch_size, cfg.lr) == ("runs/x", 7, "cpu", 3, 2e-4)
    assert cfg.model == "micro" and cfg.tasks == {"caption": 1.0, "vqa": 2.0}
    assert cfg.data == {"shapes": 1.0, "jsonl:a.jsonl": 0.5}
    assert cfg.model_overrides == {"dropout": 0.0, "code_grid_size": 4}
    assert cfg.betas == (0.9, 0.95) and cfg.augment is False and cfg.vq is None and cfg.init is None
    assert (cfg.train_scenes, cfg.grad_accum, cfg.resume) == (100, 2, "yes")
    micro = multitask.parse_config(["--config", "train/configs/micro.py", "--no-resume"])
    assert micro.model == "micro" and micro.resume == "no"
    assert multitask.parse_config([]).model == "shapes"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "max_stepz=3"], "unknown config fields"),
        (["--max-steps", "many"], "max_steps='many'"),
        (["--tasks", "captioning=1"], "unknown task 'captioning'"),
        (["--schedule", "step"], "schedule must be"),
    ],
)
def test_bad_overrides_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit):
        multitask.parse_config(argv)
    assert message in capsys.readouterr().err


def test_lr_schedule_warms_up_then_decays():
    cfg = multitask.parse_config(["--max-steps", "100", "--warmup-steps", "10", "--min-lr-ratio", "0.1"])
    factors = [multitask.lr_factor(s, cfg) for s in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[100] == pytest.approx(0.1) and all(a >= b for a, b in pairwise(factors[10:]))


def test_training_lowers_the_loss_and_resume_repeats_it(tmp_path, vocab_dir):
    straight = multitask.main(micro_args(tmp_path / "a", vocab_dir))
    losses = straight["losses"]
    assert len(losses) == 20 and straight["step"] == 20
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses

    first = multitask.main(micro_args(tmp_path / "b", vocab_dir, "--stop-after", "10"))
    assert first["step"] == 10 and first["losses"] == pytest.approx(losses[:10], abs=1e-6)
    # resumed automatically (train_state.pt is in out_dir), with a data worker this time
    second = multitask.main(micro_args(tmp_path / "b", vocab_dir, "--num-workers", "1"))
    assert second["step"] == 20 and second["losses"] == pytest.approx(losses[10:], abs=1e-6)
    logged = logged_losses(tmp_path / "b")
    assert sorted(logged) == list(range(1, 21))
    assert [logged[s] for s in range(1, 21)] == pytest.approx(losses, abs=1e-6)

    state = torch.load(tmp_path / "b" / "train_state.pt", weights_only=True)
    assert state["step"] == 20 and state["next_batch"] == 20
    loaded = load_checkpoint(tmp_path / "b" / "model")
    assert loaded.meta["step"] == 20 and len(loaded.vocab) == loaded.model.config.vocab_size
    for key, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, state["model"][key]), key


def test_time_limit_stops_after_a_step_saves_and_can_resume(tmp_path, vocab_dir):
    args = micro_args(tmp_path, vocab_dir, "--eval-generate", "0", "--eval-samples", "4")
    stopped = multitask.main([*args, "--time-limit", "1e-9"])
    assert stopped["step"] == 1 and "val_loss" in stopped["metrics"]  # evaluated at the stop
    assert torch.load(tmp_path / "train_state.pt", weights_only=True)["step"] == 1
    assert multitask.main(args)["step"] == 20  # the limit is a run-only field: resuming drops it


def test_image_tasks_are_dropped_without_vq_and_eval_runs(tmp_path, vocab_dir, caplog):
    args = micro_args(
        tmp_path,
        vocab_dir,
        "--vq",
        "none",
        "--max-steps",
        "2",
        "--eval-samples",
        "4",
        "--eval-generate",
        "2",
        "--tasks",
        "grounding=1,itm=1,text_to_image=1",
    )
    with caplog.at_level(logging.WARNING, logger="multitask"):
        result = multitask.main(args)
    assert "dropping image-output tasks ['text_to_image']" in caplog.text
    metrics = result["metrics"]
    assert metrics["grounding/parsed"] == 1.0  # the bin constraint always gives a well-formed box
    assert {"val_loss", "val_loss/itm", "itm/accuracy", "grounding/acc@0.5"} <= set(metrics)
    assert "text_to_image/parsed" not in metrics
    # whether the model reads the image is logged beside the losses
    assert {"val_gap/itm", "val_gap/grounding", "pos_bias_std/decoder_cross", "cross_entropy/layer0"} <= set(
        metrics
    )
    assert all(0 <= metrics[k] <= math.log(16) + 1e-4 for k in metrics if k.startswith("cross_entropy/"))


def test_fine_tuning_starts_from_a_checkpoint_and_keeps_its_vocab(tmp_path, vocab_dir):
    vocab = Vocab.load(vocab_dir)
    torch.manual_seed(1)
    start = build_model("micro", vocab_size=len(vocab), d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64)
    save_checkpoint(start, vocab, tmp_path / "init")
    args = micro_args(tmp_path / "ft", vocab_dir, "--init", str(tmp_path / "init"), "--max-steps", "2")
    result = multitask.main([*args, "--model", "shapes"])
    assert result["step"] == 2
    tuned = load_checkpoint(tmp_path / "ft" / "model")
    assert tuned.model.config.d_model == 32 and len(tuned.vocab) == len(vocab)  # not the shapes size
    before, after = start.state_dict(), tuned.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_image_tokens_model_trains_saves_its_tokenizer_and_predicts(tmp_path, vocab_dir):
    """image_tokens (the encoder reads each image's VQ codes): training, its evaluation, the saved
    checkpoint (which must carry the tokenizer even without image-output tasks) and the Predictor."""
    from ofa_unified.inference import Predictor, Request
    from ofa_unified.vq import VQConfig, VQTokenizer

    VQTokenizer(VQConfig(channels=8, num_res_blocks=0, patch_hidden=8, codebook_size=16, code_dim=8)).save(
        tmp_path / "vq"
    )
    args = micro_args(
        tmp_path / "run", vocab_dir, "--max-steps", "3", "--eval-samples", "4", "--eval-generate", "2"
    )
    args[args.index("--model-overrides") + 1] = "dropout=0,image_tokens=true"
    result = multitask.main([*args, "--vq", str(tmp_path / "vq")])
    assert result["step"] == 3 and "vqa/vqa_accuracy" in result["metrics"]
    model_dir = tmp_path / "run" / "model"
    assert (model_dir / "vq" / "vq_config.json").exists()
    predictor = Predictor.from_checkpoint(model_dir)
    assert predictor.model.config.image_tokens
    image = shapes.sample("val", 0, 64)[0]
    answer = predictor.predict([Request(image, "vqa", {"question": "what color is the circle?"})])[0]
    assert isinstance(answer["answer"], str)
    with pytest.raises(ValueError, match="needs its VQ tokenizer|pass its VQ tokenizer"):
        Predictor(predictor.model, predictor.vocab)
    with pytest.raises(ValueError, match="image_tokens reads images as VQ codes"):
        multitask.main([*args, "--vq", "none", "--no-resume"])


def test_image_expert_fine_tune_trains_image_rows_alone(tmp_path, vocab_dir):
    """train_only=IMAGE_OUTPUT_PARAMS on an image_expert fine-tune: only those tensors move (the
    stem's BatchNorm statistics included, they stay), so a text row's logits are bit for bit the
    checkpoint's while an image row's change."""
    from ofa_unified.model import IMAGE_OUTPUT_PARAMS
    from ofa_unified.vq import VQConfig, VQTokenizer, encoder_codes

    vq = VQTokenizer(VQConfig(channels=8, num_res_blocks=0, patch_hidden=8, codebook_size=16, code_dim=8))
    vq.save(tmp_path / "vq")
    vq_args = ["--vq", str(tmp_path / "vq"), "--tasks", "caption=1,image_infilling=1"]
    multitask.main(micro_args(tmp_path / "init", vocab_dir, "--max-steps", "1", *vq_args))
    start = load_checkpoint(tmp_path / "init" / "model").model
    args = micro_args(
        tmp_path / "ft", vocab_dir, "--init", str(tmp_path / "init" / "model"), "--max-steps", "2",
        *vq_args, "--tasks", "image_infilling=1,text_to_image=1", "--train-only", IMAGE_OUTPUT_PARAMS,
    )  # fmt: skip
    args[args.index("--model-overrides") + 1] = "dropout=0,image_expert=true,image_tokens=true"
    assert multitask.main(args)["step"] == 2
    tuned = load_checkpoint(tmp_path / "ft" / "model")
    before, after = start.state_dict(), tuned.model.state_dict()
    pattern = re.compile(IMAGE_OUTPUT_PARAMS)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(pattern.search(k) for k in moved), sorted(moved)
    assert any(".image_ffn." in k for k in after if k not in before)
    assert all(pattern.search(k) for k in after if k not in before)

    image = torch.randn(2, 3, 64, 64)
    ids = torch.randint(4, 300, (2, 6))
    dec = torch.randint(4, 300, (2, 5))
    code = torch.tensor([False, True])
    codes = encoder_codes(tuned.model.config, vq, tuned.vocab, image, code)
    with torch.no_grad():
        want, _ = start.eval()(ids, dec, image, code_mask=code)
        got, _ = tuned.model.eval()(ids, dec, image, code_mask=code, image_codes=codes)
    assert torch.equal(got[0], want[0])
    assert (got[1] - want[1]).abs().max() > 1e-4


def test_train_only_that_trains_nothing_is_refused(tmp_path, vocab_dir, capsys):
    with pytest.raises(SystemExit):
        multitask.main(micro_args(tmp_path, vocab_dir, "--train-only", "("))
    assert "train_only must be a regular expression" in capsys.readouterr().err
    with pytest.raises(ValueError, match="matches no parameter"):
        multitask.main(micro_args(tmp_path, vocab_dir, "--max-steps", "1", "--train-only", "^nothing$"))


def test_sample_means_weigh_each_sample_alike():
    labels = torch.tensor([[5, 6, 7, 8], [5, -100, -100, -100]])
    per_token = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    # token mean: (4 + 3) / 5 = 1.4, the long answer dominates; sample means: 1 and 3
    assert multitask.sample_means(per_token, labels).tolist() == [1.0, 3.0]


def test_sample_loss_normalization_trains_and_is_checked(tmp_path, vocab_dir, capsys):
    by_token = multitask.main(micro_args(tmp_path / "t", vocab_dir, "--max-steps", "3"))
    by_sample = multitask.main(
        micro_args(tmp_path / "s", vocab_dir, "--max-steps", "20", "--loss-normalization", "sample")
    )
    losses = by_sample["losses"]
    assert by_sample["losses"][0] != pytest.approx(by_token["losses"][0], abs=1e-4)  # a mixed-length batch
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses
    with pytest.raises(SystemExit):
        multitask.main(micro_args(tmp_path / "x", vocab_dir, "--loss-normalization", "task"))
    assert "loss_normalization" in capsys.readouterr().err
