#!/usr/bin/env python
"""Several training runs of each model (seeds, machines) summed up from their ``metrics.json``.

A MaskPyramid run on ``shapes`` moves by several AP from one seed to the next, so configs are
compared over several runs. For each run directory (a ``train_net.py`` OUTPUT_DIR whose training
ended with an evaluation) this prints the final COCO metrics, the mean total loss over the last
100 iterations (how far training came down) and the median s/iter; then, per group, the mean and
the sample standard deviation over its runs. With ``--per-class``, a second table gives each
run's AP per category (``COCOEvaluator``'s ``AP-<class>``), and the means.

Usage:
  python benchmarks/runs_summary.py \
      --runs "Mask R-CNN" output/rcnn_seed1 output/rcnn_seed2 \
      --runs MaskPyramid output/mp_seed1 output/mp_seed2 [--task segm] [--per-class]
"""

import argparse
import statistics
import sys

from maskpyramid.engine.runs import (
    METRICS,
    last_evaluation,
    metrics_file,
    read_metrics,
    sample_sd,
    training_summary,
)


def read_run(run_dir: str, task: str, last: int = 100):
    """(metrics dict, final loss, median s/iter) of one run; exits naming the file at fault."""
    try:
        rows = read_metrics(run_dir)
        result = last_evaluation(rows, task, source=metrics_file(run_dir))
    except (OSError, ValueError) as e:
        sys.exit(str(e))
    summary = training_summary(rows, last)
    return result, summary["final_loss"], summary["s_per_iter"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", nargs="+", action="append", required=True, metavar="LABEL RUN_DIR",
        help="a label and its run directories",
    )  # fmt: skip
    parser.add_argument("--task", default="segm", choices=("segm", "bbox"))
    parser.add_argument("--per-class", action="store_true", help="also AP per category")
    args = parser.parse_args()
    for label, *dirs in args.runs:
        if not dirs:
            parser.error(f"--runs {label}: needs at least one run directory")
    cols = list(METRICS) + ["bbox AP"]
    print(f"| model | run | {' | '.join(f'{args.task} {c}' if c in METRICS else c for c in cols)}"
          " | final loss | s/iter |")  # fmt: skip
    print("|---" * (len(cols) + 4) + "|")
    groups = []
    for label, *dirs in args.runs:
        results = []
        groups.append((label, dirs, results))
        for d in dirs:
            metrics, loss, sec = read_run(d, args.task)
            results.append(metrics)
            values = " | ".join(f"{metrics[c]:.1f}" for c in cols)
            print(f"| {label} | {d} | {values} | {loss:.3f} | {sec:.3f} |")
        if len(results) > 1:
            stats = []
            for c in cols:
                xs = [r[c] for r in results]
                stats.append(f"{statistics.mean(xs):.1f} ± {sample_sd(xs):.1f}")
            print(f"| **{label}, mean ± sd of {len(results)}** | | {' | '.join(stats)} | | |")
    if args.per_class:
        print_per_class(groups, args.task)


def print_per_class(groups, task):
    """Each run's AP per category, and each group's mean (categories in the first run's order)."""
    names = list(groups[0][2][0]["classes"])
    if not names:
        sys.exit(f"{groups[0][1][0]}: its evaluation has no per-category {task} AP")
    print(f"\n| model | run | {' | '.join(f'{task} AP-{n}' for n in names)} |")
    print("|---" * (len(names) + 2) + "|")
    nan = float("nan")
    for label, dirs, results in groups:
        for d, r in zip(dirs, results):
            values = " | ".join(f"{r['classes'].get(n, nan):.1f}" for n in names)
            print(f"| {label} | {d} | {values} |")
        if len(results) > 1:
            means = [statistics.mean(r["classes"].get(n, nan) for r in results) for n in names]
            print(f"| **{label}, mean of {len(results)}** | | "
                  f"{' | '.join(f'{m:.1f}' for m in means)} |")  # fmt: skip


if __name__ == "__main__":
    main()
