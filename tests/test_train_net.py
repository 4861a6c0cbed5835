"""train_net.py end to end: --register-coco, 2 CPU processes, COCO table, --eval-only, --resume."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY_MASK_RCNN


def _run(*args, timeout=600):
    proc = subprocess.run(
        [sys.executable, "train_net.py", *map(str, args)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def _metrics(out):
    return [json.loads(line) for line in open(out / "metrics.json")]


def _last_trained_iteration(out):
    return max(m["iteration"] for m in _metrics(out) if "total_loss" in m)


@pytest.fixture(scope="module")
def trained(tiny_shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("train_net")
    ann = os.path.join(tiny_shapes, "shapes", "annotations")
    common = [
        "--config-file", "configs/shapes/mask_rcnn_R_18_FPN.yaml",
        "--register-coco", "mine_train", f"{ann}/instances_tiny_train.json",
        f"{tiny_shapes}/shapes/tiny_train",
        "--register-coco", "mine_val", f"{ann}/instances_tiny_val.json",
        f"{tiny_shapes}/shapes/tiny_val",
    ]  # fmt: skip
    opts = [str(o) if not isinstance(o, tuple) else repr(o) for o in TINY_MASK_RCNN]
    opts += ["DATASETS.TRAIN", "('mine_train',)", "DATASETS.TEST", "('mine_val',)",
             "SOLVER.MAX_ITER", "3", "OUTPUT_DIR", str(out)]  # fmt: skip
    log = _run(*common, "--num-gpus", 2, *opts)
    return out, common, opts, log


def test_two_process_training_on_registered_coco_data_prints_the_coco_table(trained):
    out, _, _, log = trained
    assert "World size: 2" in log and (out / "log.txt.rank1").is_file()
    assert "Evaluation results for segm" in log and "Evaluation results for bbox" in log
    assert (out / "model_final.pth").is_file() and (out / "last_checkpoint").is_file()
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out))
    assert _last_trained_iteration(out) == 2
    assert any("segm/AP" in m for m in _metrics(out))
    assert "eta:" in log and "total_loss" in log


def test_eval_only_and_resume(trained):
    out, common, opts, _ = trained
    log = _run(*common, "--eval-only", *opts, "MODEL.WEIGHTS", out / "model_final.pth")
    assert "Evaluation results for segm" in log
    log = _run(*common, "--resume", *opts, "SOLVER.MAX_ITER", 5)
    assert "Starting training from iteration 3" in log
    assert _last_trained_iteration(out) == 4
