"""Reading a training run: the ``metrics.json`` that ``train_net.py`` writes in its OUTPUT_DIR.

detectron2's ``JSONWriter`` appends one JSON object per line: a training row every 20 iterations
(``iteration``, ``total_loss``, each ``loss_*``, ``lr``, ``time``, and the project's
``peak_memory_mib``), and after an evaluation a row with ``<task>/AP``, ``<task>/AP50``, ...,
``<task>/AP-<class>``. The functions here raise errors naming the file (and line) at fault, so
that scripts can print them as they are; they do not import matplotlib (plots are in
:mod:`maskpyramid.vis.plots`).
"""

import json
import math
import os
import statistics
from typing import Dict, List

__all__ = [
    "METRICS",
    "metrics_file",
    "read_metrics",
    "last_evaluation",
    "training_summary",
    "sample_sd",
]

# COCOEvaluator's summary metrics, in its order.
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def metrics_file(path: str) -> str:
    """The ``metrics.json`` of a run: ``path`` itself, or ``path/metrics.json`` for a directory."""
    return os.path.join(path, "metrics.json") if os.path.isdir(path) else path


def read_metrics(path: str) -> List[dict]:
    """The rows of a run's ``metrics.json``, in file order.

    Args:
        path: a ``train_net.py`` OUTPUT_DIR, or its ``metrics.json``.

    Returns:
        one dict per line (blank lines are skipped).

    Raises:
        FileNotFoundError: no such file (the message names it).
        ValueError: a line is not a JSON object (``<file>:<line>: ...``), or the file is empty.
    """
    file = metrics_file(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path}: no such file or directory (should be a train_net.py OUTPUT_DIR "
            "or its metrics.json)"
        )
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: no such file (is {path} a train_net.py OUTPUT_DIR?)")
    rows = []
    with open(file) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}:{n}: not JSON ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{file}:{n}: not a JSON object ({type(row).__name__})")
            rows.append(row)
    if not rows:
        raise ValueError(f"{file}: no records (has the training written any?)")
    return rows


def last_evaluation(rows: List[dict], task: str = "segm", source: str = "") -> dict:
    """The last evaluation of a run.

    Args:
        rows: from :func:`read_metrics`.
        task: "segm" or "bbox", the prefix of COCOEvaluator's keys.
        source: the file the rows come from, for the error message.

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "bbox AP", "classes"}``: the task's metrics
        (nan where missing; COCO writes nan for a size without objects), the bbox AP of the same
        row (nan when absent) and ``classes``, ``{class name: AP}`` from ``<task>/AP-<class>``.

    Raises:
        ValueError: no row holds ``<task>/AP``.
    """
    evals = [r for r in rows if f"{task}/AP" in r]
    if not evals:
        where = f"{source}: " if source else ""
        raise ValueError(f"{where}no {task} evaluation (did the training end with one?)")
    last = evals[-1]
    nan = float("nan")
    result = {m: last.get(f"{task}/{m}", nan) for m in METRICS}
    result["bbox AP"] = last.get("bbox/AP", nan)
    prefix = f"{task}/AP-"
    result["classes"] = {k[len(prefix) :]: v for k, v in last.items() if k.startswith(prefix)}
    return result


def training_summary(rows: List[dict], last: int = 100) -> Dict[str, float]:
    """How far a run came: the training rows (those with ``total_loss``) summed up.

    Args:
        rows: from :func:`read_metrics`.
        last: the final loss is the mean ``total_loss`` over this many last iterations.

    Returns:
        ``iterations`` (the last training row's), ``final_loss``, ``s_per_iter`` (the median of
        ``time``), ``peak_memory_mib`` (the largest over all rows) and ``lr`` (the last); nan where
        the rows hold no such data.
    """
    nan = float("nan")
    train = [r for r in rows if "total_loss" in r and "iteration" in r]
    summary = dict(iterations=nan, final_loss=nan, s_per_iter=nan, peak_memory_mib=nan, lr=nan)
    if train:
        end = train[-1]["iteration"]
        summary["iterations"] = end
        summary["final_loss"] = statistics.mean(
            r["total_loss"] for r in train if r["iteration"] > end - last
        )
        times = [r["time"] for r in train if "time" in r]
        if times:
            summary["s_per_iter"] = statistics.median(times)
        lrs = [r["lr"] for r in train if "lr" in r]
        if lrs:
            summary["lr"] = lrs[-1]
    memory = [r["peak_memory_mib"] for r in rows if "peak_memory_mib" in r]
    memory = [m for m in memory if not math.isnan(m)]
    if memory:
        summary["peak_memory_mib"] = max(memory)
    return summary


def sample_sd(values: List[float]) -> float:
    """The sample standard deviation; nan when a value is nan (COCO's AP of an absent size)."""
    return float("nan") if any(math.isnan(v) for v in values) else statistics.stdev(values)
