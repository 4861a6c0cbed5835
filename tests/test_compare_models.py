"""benchmarks/compare_models.py: its measurements of one model, its table and its figure."""

import importlib.util
import json
import os

import cv2
import pytest
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from tests.conftest import REPO
from tests.maskpyramid.modeling.test_meta_arch import CONFIG, TINY


def _script():
    path = os.path.join(REPO, "benchmarks", "compare_models.py")
    spec = importlib.util.spec_from_file_location("compare_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path, key, ap, train_s, infer_s):
    run = tmp_path / "runs" / key
    run.mkdir(parents=True)
    rows = [{"iteration": i, "total_loss": 2.0, "time": 9.0, "peak_memory_mib": 99.0}
            for i in range(19, 1500, 20)]  # fmt: skip
    rows.append({"iteration": 1499, **{f"segm/{m}": ap + k for k, m in enumerate(
        ("AP", "AP50", "AP75", "APs", "APm", "APl"))}, "bbox/AP": ap + 10})  # fmt: skip
    (run / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (run / "model_final.pth").write_bytes(b"")
    return {
        "inference_s": infer_s,
        "inference_images": 300,
        "masks_per_image": 4.0,
        "train_s_per_iter": train_s,
        "train_iters": 20,
        "peak_memory_mib": 2000.0,
        "inference_peak_memory_mib": float("nan"),
        "device": "a CPU, torch threads 1",
    }


def test_table_and_figures_from_the_runs_and_measurements(tmp_path, capsys, monkeypatch):
    cm = _script()
    measured = {
        "mask_pyramid": _run(tmp_path, "mask_pyramid", 37.0, 3.0, 0.2),
        "scratch_mask_rcnn": _run(tmp_path, "scratch_mask_rcnn", 32.5, 2.4, 0.25),
        "mask_rcnn": _run(tmp_path, "mask_rcnn", 32.0, 2.0, 0.25),
    }
    monkeypatch.setattr(cm, "measure_all", lambda keys, args: measured)
    report = tmp_path / "docs" / "cmp"
    assert cm.main(["--output", str(tmp_path / "runs"), "--report", str(report)]) == 0
    # every model_final.pth exists: nothing is trained
    assert capsys.readouterr().out.count("not trained again") == 3
    lines = (tmp_path / "docs" / "cmp.md").read_text().splitlines()
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|") == 14
    assert lines[2].startswith("| MaskPyramid (`configs/shapes/mask_pyramid_R_18_FPN_long.yaml`) "
                               "| 37.0 | 38.0 | 39.0 | 40.0 | 41.0 | 42.0 | 47.0 | 3.000 (1.50x) "
                               "| 0.200 (0.80x) | 4.0 | 2000 | 99 |")  # fmt: skip
    assert lines[4].startswith("| Mask R-CNN, detectron2 ") and "(1." not in lines[4]
    assert "1500 iterations, seed 42" in "\n".join(lines)
    for png in ("cmp.png", "cmp_curves.png"):
        image = cv2.imread(str(tmp_path / "docs" / png))
        assert image.shape[0] > 300 and image.shape[1] > 600 and image.std() > 10


def test_a_run_without_evaluation_is_named(tmp_path, capsys):
    cm = _script()
    with pytest.raises(SystemExit) as e:
        cm.main(["--help"])
    assert e.value.code == 0 and "--schedule" in capsys.readouterr().out
    args = cm.get_parser().parse_args(["--output", str(tmp_path), "--models", "mask_rcnn"])
    (tmp_path / "mask_rcnn").mkdir()
    (tmp_path / "mask_rcnn" / "metrics.json").write_text('{"iteration": 0, "total_loss": 1}\n')
    try:
        cm.rows_of(["mask_rcnn"], args, {"mask_rcnn": {}})
    except SystemExit as e:
        assert "mask_rcnn" in str(e) and "evaluation" in str(e)
    else:
        raise AssertionError("no error")


def test_measure_one_model_from_its_checkpoint(make_cfg, tmp_path):
    cfg = make_cfg(*TINY, "DATASETS.TEST", ("tiny_shapes_val",), config_file=CONFIG)
    model = build_model(cfg)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model")
    (tmp_path / "config.yaml").write_text(cfg.dump())
    out = tmp_path / "m.json"
    _script().measure(str(tmp_path / "config.yaml"), str(tmp_path / "model.pth"), str(out),
                      threads=1, images=3, train_iters=2, device="cpu")  # fmt: skip
    result = json.loads(out.read_text())
    assert result["inference_images"] == 3 and result["train_iters"] == 2
    assert result["inference_s"] > 0 and result["train_s_per_iter"] > 0
    assert result["peak_memory_mib"] > 50 and result["masks_per_image"] >= 0
