"""maskpyramid.engine.runs reads a train_net.py OUTPUT_DIR's metrics.json and names the file
(and line) at fault."""

import json
import math
import sys

import pytest

from maskpyramid.engine.runs import last_evaluation, read_metrics, training_summary


def training_rows(iterations=range(19, 300, 20)):
    """Training rows as detectron2's JSONWriter logs them (every 20 iterations)."""
    return [
        {
            "iteration": it,
            "total_loss": 3.0 - it / 100,
            "loss_mask_p3": 1.0 - it / 1000,
            "loss_mask_p4": 0.9 - it / 1000,
            "loss_cls": 0.5,
            "time": 0.5 + (it % 3) / 10,
            "data_time": 0.01,
            "lr": 0.02 * (it + 1) / 300,
            "peak_memory_mib": 1000.0 + it,
        }
        for it in iterations
    ]


EVAL_ROW = {
    "iteration": 299,
    "segm/AP": 41.5,
    "segm/AP50": 70.25,
    "segm/AP75": 40.0,
    "segm/APs": float("nan"),
    "segm/APm": 35.0,
    "segm/APl": 50.0,
    "segm/AP-disc": 45.0,
    "segm/AP-square": 38.0,
    "bbox/AP": 44.0,
}


def write_run(directory, rows):
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "metrics.json", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return directory


def test_read_metrics_from_dir_and_file(tmp_path):
    rows = training_rows() + [EVAL_ROW]
    run = write_run(tmp_path / "run", rows)
    from_dir = read_metrics(str(run))
    assert len(from_dir) == len(rows)
    assert from_dir[0]["iteration"] == 19 and from_dir[-1]["segm/AP"] == 41.5
    assert read_metrics(str(run / "metrics.json")) == from_dir


def test_last_evaluation():
    early = dict(EVAL_ROW, iteration=99, **{"segm/AP": 10.0, "segm/AP-disc": 5.0})
    rows = training_rows() + [early, EVAL_ROW]
    result = last_evaluation(rows)
    assert result["AP"] == 41.5 and result["AP50"] == 70.25 and result["APl"] == 50.0
    assert math.isnan(result["APs"])
    assert result["bbox AP"] == 44.0
    assert result["classes"] == {"disc": 45.0, "square": 38.0}
    bbox_only = [{"iteration": 299, "bbox/AP": 44.0, "bbox/AP50": 60.0}]
    assert last_evaluation(bbox_only, task="bbox")["AP50"] == 60.0
    segm_only = {k: v for k, v in EVAL_ROW.items() if not k.startswith("bbox/")}
    assert math.isnan(last_evaluation([segm_only])["bbox AP"])


def test_no_evaluation_names_the_source():
    with pytest.raises(ValueError, match=r"run/metrics\.json: no segm evaluation"):
        last_evaluation(training_rows(), source="run/metrics.json")
    with pytest.raises(ValueError, match="no segm evaluation"):
        last_evaluation([{"iteration": 9, "bbox/AP": 1.0}])


def test_training_summary():
    rows = training_rows() + [EVAL_ROW]
    summary = training_summary(rows)
    assert summary["iterations"] == 299
    # The last 100 iterations (200..299) hold the rows of 219, 239, ..., 299.
    last = [3.0 - it / 100 for it in range(219, 300, 20)]
    assert summary["final_loss"] == pytest.approx(sum(last) / len(last))
    assert summary["s_per_iter"] == pytest.approx(0.6)
    assert summary["peak_memory_mib"] == 1299.0
    assert summary["lr"] == pytest.approx(0.02)
    assert training_summary(rows, last=20)["final_loss"] == pytest.approx(3.0 - 2.99)


def test_training_summary_without_data():
    summary = training_summary([EVAL_ROW])
    assert set(summary) == {"iterations", "final_loss", "s_per_iter", "peak_memory_mib", "lr"}
    assert all(math.isnan(v) for v in summary.values())
    rows = [{k: v for k, v in r.items() if k not in ("time", "peak_memory_mib")}
            for r in training_rows()]  # fmt: skip
    summary = training_summary(rows)
    assert summary["iterations"] == 299
    assert math.isnan(summary["s_per_iter"]) and math.isnan(summary["peak_memory_mib"])


def test_missing_run_names_the_path(tmp_path):
    missing = tmp_path / "no_such_run"
    with pytest.raises(FileNotFoundError) as e:
        read_metrics(str(missing))
    assert str(missing) in str(e.value) and "OUTPUT_DIR" in str(e.value)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty_dir/metrics\.json: no such file"):
        read_metrics(str(tmp_path / "empty_dir"))


def test_bad_json_names_file_and_line(tmp_path):
    run = write_run(tmp_path / "run", training_rows()[:2])
    with open(run / "metrics.json", "a") as f:
        f.write('{"iteration": 59, "total_loss": \n')
    with pytest.raises(ValueError) as e:
        read_metrics(str(run))
    assert f"{run / 'metrics.json'}:3: not JSON" in str(e.value)
    (run / "metrics.json").write_text('{"iteration": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"metrics\.json:2: not a JSON object"):
        read_metrics(str(run))


def test_empty_file(tmp_path):
    run = write_run(tmp_path / "run", [])
    with pytest.raises(ValueError, match=r"metrics\.json: no records"):
        read_metrics(str(run))


def test_runs_module_does_not_import_matplotlib():
    import subprocess

    code = "import sys, maskpyramid.engine.runs; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_sample_sd_is_nan_where_a_value_is():
    from maskpyramid.engine.runs import sample_sd

    assert sample_sd([1.0, 3.0]) == pytest.approx(2**0.5)
    assert math.isnan(sample_sd([1.0, float("nan")]))  # statistics.stdev raises on it
