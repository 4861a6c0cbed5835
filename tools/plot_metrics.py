#!/usr/bin/env python
r"""Figures of ``train_net.py`` runs from their ``metrics.json``: training curves, AP bar charts.

``curves`` overlays the training curves of runs (total loss, MaskPyramid's per-level mask losses,
the other losses, learning rate). ``ap`` draws the final evaluation's AP, APs, APm and APl per
model as bars; a model given several runs (seeds) gets the mean, with the sample standard
deviation as error bars; it also prints the plotted values as a Markdown table. A RUN/DIR is a
``train_net.py`` OUTPUT_DIR or its ``metrics.json``.

Usage:
  python tools/plot_metrics.py curves output/mp_long output/rcnn_long \
      --labels MaskPyramid "Mask R-CNN" --output figures/curves.png [--smooth 5]
  python tools/plot_metrics.py ap \
      --runs "Mask R-CNN" output/rcnn_seed1 output/rcnn_seed2 \
      --runs MaskPyramid output/mp_seed1 output/mp_seed2 \
      --output figures/ap.png [--task segm]
"""

import argparse
import os
import statistics
import sys

from maskpyramid.engine.runs import last_evaluation, metrics_file, read_metrics, sample_sd
from maskpyramid.vis.plots import AP_METRICS, plot_ap_bars, plot_training_curves


def run_label(run: str) -> str:
    """A run's default label: its path as given, without a trailing ``metrics.json``."""
    run = os.path.normpath(run)
    if os.path.basename(run) == "metrics.json":
        return os.path.dirname(run) or run
    return run


def curves(args, parser):
    if args.labels is not None and len(args.labels) != len(args.run):
        parser.error(f"--labels: {len(args.labels)} labels for {len(args.run)} runs")
    if args.smooth < 1:
        parser.error(f"--smooth: must be at least 1, got {args.smooth}")
    labels = args.labels or [run_label(r) for r in args.run]
    if len(set(labels)) != len(labels):
        parser.error(f"runs need distinct labels, got {labels} (give --labels)")
    runs = {label: read_metrics(run) for label, run in zip(labels, args.run)}
    print(plot_training_curves(runs, args.output, smooth=args.smooth))


def ap(args, parser):
    for label, *dirs in args.runs:
        if not dirs:
            parser.error(f"--runs {label}: needs at least one run directory")
    labels = [label for label, *_ in args.runs]
    if len(set(labels)) != len(labels):
        parser.error(f"--runs: labels must be distinct, got {labels}")
    means, errors, cells = {}, {}, {}
    for label, *dirs in args.runs:
        evals = [last_evaluation(read_metrics(d), args.task, metrics_file(d)) for d in dirs]
        means[label] = {m: statistics.mean(e[m] for e in evals) for m in AP_METRICS}
        if len(evals) > 1:
            errors[label] = {m: sample_sd([e[m] for e in evals]) for m in AP_METRICS}
        cells[label] = [
            f"{means[label][m]:.1f}" + (f" ± {errors[label][m]:.1f}" if label in errors else "")
            for m in AP_METRICS
        ]
    plot_ap_bars(means, args.output, task=args.task, errors=errors)
    print(f"| model | runs | {' | '.join(f'{args.task} {m}' for m in AP_METRICS)} |")
    print("|---" * (len(AP_METRICS) + 2) + "|")
    for label, *dirs in args.runs:
        print(f"| {label} | {len(dirs)} | {' | '.join(cells[label])} |")
    print(f"\n{args.output}")


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__[__doc__.index("Usage:") :],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{curves,ap}")
    c = sub.add_parser("curves", help="training curves of runs, overlaid",
                       description="Training curves of runs, overlaid, in one figure.")  # fmt: skip
    c.add_argument("run", nargs="+", metavar="RUN",
                   help="a train_net.py OUTPUT_DIR or its metrics.json")  # fmt: skip
    c.add_argument("--output", required=True, metavar="PNG",
                   help="the image to write (its directory is created)")  # fmt: skip
    c.add_argument("--labels", nargs="+", metavar="LABEL",
                   help="one legend label per RUN (default: the RUN paths)")  # fmt: skip
    c.add_argument("--smooth", type=int, default=1, metavar="N",
                   help="plot the mean of the last N logged values (default: 1, raw)")  # fmt: skip
    a = sub.add_parser("ap", help="bar chart of the final evaluation's AP per model",
                       description="Final evaluation's AP, APs, APm, APl per model, as bars; "
                       "several runs of a model give mean bars with sd error bars.")  # fmt: skip
    a.add_argument("--runs", nargs="+", action="append", required=True, metavar="LABEL DIR",
                   help="a model's label and its run directories (or metrics.json files); "
                   "repeat for each model")  # fmt: skip
    a.add_argument("--output", required=True, metavar="PNG",
                   help="the image to write (its directory is created)")  # fmt: skip
    a.add_argument("--task", default="segm", choices=("segm", "bbox"),
                   help="which evaluation to plot (default: segm)")  # fmt: skip
    args = parser.parse_args()
    try:
        {"curves": curves, "ap": ap}[args.command](args, parser)
    except (OSError, ValueError) as e:  # missing or bad metrics.json, unwritable --output
        sys.exit(str(e))


if __name__ == "__main__":
    main()
