"""maskpyramid.vis.plots writes readable figures of runs, and tools/plot_metrics.py draws them
from the command line, failing with one line naming the file at fault."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.image import imread

from maskpyramid.vis.plots import _curve_panels, plot_ap_bars, plot_training_curves
from tests.conftest import REPO

TOOL = os.path.join(REPO, "tools", "plot_metrics.py")


def training_rows(seed=0, levels=("p3", "p4", "p5"), iterations=range(19, 400, 20)):
    rng = np.random.default_rng(seed)
    rows = []
    for it in iterations:
        row = {"iteration": it, "total_loss": 4.0 * 0.995**it + rng.uniform(0, 0.2)}
        row.update({f"loss_mask_{p}": 1.0 * 0.99**it + 0.1 for p in levels})
        row.update(loss_cls=0.5 * 0.99**it, loss_box_reg=0.3, time=0.4, lr=0.02 * min(1, it / 100))
        rows.append(row)
    return rows


def eval_row(ap, iteration=399):
    return {
        "iteration": iteration,
        "segm/AP": ap, "segm/AP50": ap + 20, "segm/AP75": ap - 5,
        "segm/APs": float("nan"), "segm/APm": ap - 10, "segm/APl": ap + 5,
        "segm/AP-disc": ap + 1, "bbox/AP": ap + 3, "bbox/AP50": ap + 25, "bbox/AP75": ap,
        "bbox/APs": 1.0, "bbox/APm": ap - 8, "bbox/APl": ap + 6,
    }  # fmt: skip


def write_run(directory, rows):
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "metrics.json", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(directory)


def assert_image(path):
    """A readable, non-blank image of some size."""
    assert os.path.isfile(path)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 10
    return image


def test_curve_panels():
    runs = {"a": training_rows(), "b": training_rows(levels=("p2", "p3")) + [eval_row(40.0)]}
    panels = dict(_curve_panels(runs))
    assert list(panels) == ["total loss", "mask losses per level", "other losses", "learning rate"]
    assert panels["total loss"] == ["total_loss"]
    assert panels["mask losses per level"] == [f"loss_mask_{p}" for p in ("p2", "p3", "p4", "p5")]
    assert panels["other losses"] == ["loss_box_reg", "loss_cls"]
    assert panels["learning rate"] == ["lr"]
    # Mask R-CNN has no per-level losses; the panel is left out, loss_mask is an "other" loss.
    rcnn = [dict(iteration=it, total_loss=1.0, loss_mask=0.6) for it in (19, 39)]
    assert _curve_panels({"rcnn": rcnn}) == [("total loss", ["total_loss"]),
                                             ("other losses", ["loss_mask"])]  # fmt: skip
    levels_sort_numerically = [{"iteration": 1, "loss_pseudo_p10": 1.0, "loss_pseudo_p9": 1.0}]
    assert _curve_panels({"x": levels_sort_numerically})[0][1] == [
        "loss_pseudo_p9",
        "loss_pseudo_p10",
    ]


def test_plot_training_curves(tmp_path):
    runs = {"MaskPyramid": training_rows(0), "other seed": training_rows(1) + [eval_row(40.0)]}
    path = str(tmp_path / "figures" / "new_dir" / "curves.png")
    assert plot_training_curves(runs, path, smooth=3) == path
    raw = assert_image(path)
    # Four panels on a 2x2 grid, a single panel alone: the figure is bigger.
    single = str(tmp_path / "single.png")
    plot_training_curves({"a": [dict(iteration=it, total_loss=1.0 / it) for it in (1, 2)]}, single)
    assert raw.shape[0] > assert_image(single).shape[0]


def test_plot_training_curves_without_training_rows(tmp_path):
    with pytest.raises(ValueError, match="no training rows"):
        plot_training_curves({"a": [eval_row(40.0)]}, str(tmp_path / "x.png"))
    assert not os.path.exists(tmp_path / "x.png")


def test_plot_ap_bars(tmp_path):
    results = {"Mask R-CNN": {"AP": 38.2, "APs": float("nan"), "APm": 30.0, "APl": 45.1},
               "MaskPyramid": {"AP": 41.0, "APs": 5.0, "APm": 33.3, "APl": 47.9}}  # fmt: skip
    errors = {"MaskPyramid": {"AP": 1.5, "APs": 0.5, "APm": 2.0, "APl": 1.0}}
    path = str(tmp_path / "bars" / "ap.png")
    assert plot_ap_bars(results, path, errors=errors, title="shapes val") == path
    assert_image(path)
    with pytest.raises(ValueError):
        plot_ap_bars({}, str(tmp_path / "empty.png"))


def run_tool(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)  # fmt: skip


def test_tool_curves_and_ap(tmp_path):
    runs = {
        "mp1": training_rows(0) + [eval_row(40.0)],
        "mp2": training_rows(1) + [eval_row(44.0)],
        "rcnn": training_rows(2, levels=()) + [eval_row(35.0)],
    }
    dirs = {name: write_run(tmp_path / name, rows) for name, rows in runs.items()}
    curves = str(tmp_path / "out" / "curves.png")
    out = run_tool("curves", dirs["mp1"], os.path.join(dirs["rcnn"], "metrics.json"),
                   "--labels", "MaskPyramid", "Mask R-CNN", "--smooth", "2",
                   "--output", curves)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert_image(curves)

    bars = str(tmp_path / "out" / "ap.png")
    out = run_tool("ap", "--runs", "MaskPyramid", dirs["mp1"], dirs["mp2"],
                   "--runs", "Mask R-CNN", dirs["rcnn"], "--output", bars)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert_image(bars)
    table = out.stdout.splitlines()
    assert table[0] == "| model | runs | segm AP | segm APs | segm APm | segm APl |"
    # MaskPyramid: the mean and sample sd of 40 and 44; Mask R-CNN: one run, no sd.
    assert table[2] == "| MaskPyramid | 2 | 42.0 ± 2.8 | nan ± nan | 32.0 ± 2.8 | 47.0 ± 2.8 |"
    assert table[3] == "| Mask R-CNN | 1 | 35.0 | nan | 25.0 | 40.0 |"

    out = run_tool("ap", "--runs", "a", dirs["rcnn"], "--task", "bbox", "--output", bars)
    assert out.returncode == 0, out.stderr
    assert "| a | 1 | 38.0 | 1.0 | 27.0 | 41.0 |" in out.stdout


def test_tool_errors_name_the_file(tmp_path):
    missing = str(tmp_path / "no_such_run")
    out = run_tool("curves", missing, "--output", str(tmp_path / "c.png"))
    assert out.returncode != 0
    assert missing in out.stderr and "Traceback" not in out.stderr
    # One line of its own (import warnings of torch may come before it).
    assert out.stderr.strip().splitlines()[-1].startswith(f"{missing}: no such file or directory")
    assert not os.path.exists(tmp_path / "c.png")

    run = write_run(tmp_path / "unevaluated", training_rows())
    out = run_tool("ap", "--runs", "x", run, "--output", str(tmp_path / "a.png"))
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert f"{os.path.join(run, 'metrics.json')}: no segm evaluation" in out.stderr

    with open(os.path.join(run, "metrics.json"), "a") as f:
        f.write("{oops\n")
    out = run_tool("curves", run, "--output", str(tmp_path / "c.png"))
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert f"metrics.json:{len(training_rows()) + 1}: not JSON" in out.stderr

    out = run_tool("curves", run, run, "--labels", "one", "--output", str(tmp_path / "c.png"))
    assert out.returncode == 2 and "--labels" in out.stderr and "Traceback" not in out.stderr


def test_tool_help():
    outputs = {}
    for args in (["--help"], ["curves", "--help"], ["ap", "--help"]):
        out = run_tool(*args)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("usage:")
        outputs[args[0]] = out.stdout
    assert "curves" in outputs["--help"] and "Usage:" in outputs["--help"]
    assert all(f in outputs["curves"] for f in ("--output", "--labels", "--smooth"))
    assert all(f in outputs["ap"] for f in ("--runs", "--output", "--task"))
