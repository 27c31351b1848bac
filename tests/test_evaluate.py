"""train/evaluate.py end to end on a few shapes-world examples with a random micro model."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "train" / "evaluate.py"


def load_evaluate():
    spec = importlib.util.spec_from_file_location("evaluate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_evaluate_writes_per_task_metrics(micro_checkpoint, tmp_path):
    evaluate = load_evaluate()
    assert "image_infilling" in evaluate.IMAGE_TASKS and "caption" in evaluate.TEXT_TASKS
    out = tmp_path / "metrics.json"
    argv = [
        "--checkpoint",
        str(micro_checkpoint),
        "--n",
        "3",
        "--batch-size",
        "3",
        "--out",
        str(out),
        "--tasks",
        "caption",
        "grounding",
        "itm",
        "vqa",
    ]
    report = evaluate.main(argv)
    assert json.loads(out.read_text()) == report
    tasks = report["tasks"]
    assert set(tasks) == {"caption", "grounding", "itm", "vqa"}
    assert all(t["n"] == 3 for t in tasks.values())
    assert 0.0 <= tasks["itm"]["accuracy"] <= 1.0 and tasks["itm"]["parse_errors"] == 0  # trie: always parses
    assert {"acc@0.5", "miou"} <= set(tasks["grounding"]) and {"bleu4", "cider"} <= set(tasks["caption"])
    assert 0.0 <= tasks["vqa"]["vqa_accuracy"] <= 1.0
