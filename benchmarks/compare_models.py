#!/usr/bin/env python
"""The three models side by side on ``shapes``: one command, a Markdown table and a PNG.

MaskPyramid, the from-scratch Mask R-CNN and detectron2's Mask R-CNN, each trained by
``train_net.py`` on the same data, schedule, input size, batch and seed (their ``shapes``
configs, ``_long``: 1500 iterations, or ``--schedule short``: 200). Then, per model, in a fresh
process of its own, one after the other on the same machine and threads:
- inference s/image and masks per image (scores above 0.05) on ``--images`` of ``shapes_val``,
  with the trained weights;
- training s/iter: ``--train-iters`` steps of the real Trainer after 3 untimed ones, from the
  trained weights (the pyramids a trained MaskPyramid grows are what its step costs);
- peak memory: the process's peak resident set (CPU; data-loader workers not counted), or the
  peak of torch's CUDA allocations in the training steps (GPU).
COCO AP comes from the evaluation that ends each training (its ``metrics.json``).

A model whose ``OUTPUT/<model>/model_final.pth`` exists is not trained again (``--retrain`` to
do so); an interrupted training resumes where it stopped (``--resume``). Writes
``PREFIX.md`` (the table, the machine and the command), ``PREFIX.png`` (AP / APs / APm / APl
bars, and the costs relative to detectron2's Mask R-CNN) and ``PREFIX_curves.png`` (the three
trainings' losses and learning rate, ``tools/plot_metrics.py curves``).

Usage:
  python benchmarks/compare_models.py [--output output/compare] [--report docs/shapes_comparison]
      [--schedule long|short] [--seed 42] [--jobs 1] [--threads 1] [--device cpu|cuda]
      [--images 298] [--train-iters 20] [--models mask_pyramid scratch_mask_rcnn mask_rcnn]
"""

import argparse
import datetime
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# key: (label, config file without "_long.yaml" / ".yaml")
MODELS = {
    "mask_pyramid": ("MaskPyramid", "configs/shapes/mask_pyramid_R_18_FPN"),
    "scratch_mask_rcnn": ("Mask R-CNN, from scratch", "configs/shapes/scratch_mask_rcnn_R_18_FPN"),
    "mask_rcnn": ("Mask R-CNN, detectron2", "configs/shapes/mask_rcnn_R_18_FPN"),
}
SCORE = 0.05  # masks per image counts the outputs scoring above this


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--output",
        default="output/compare",
        metavar="DIR",
        help="one training run per model in DIR/<model> (default: %(default)s)",
    )
    parser.add_argument(
        "--report",
        default=None,
        metavar="PREFIX",
        help="writes PREFIX.md and PREFIX.png (default: DIR/comparison)",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(MODELS),
        choices=list(MODELS),
        help="which models (default: all three)",
    )
    parser.add_argument(
        "--schedule",
        default="long",
        choices=("long", "short"),
        help="the _long configs (1500 iterations) or the short ones (200)",
    )
    parser.add_argument("--seed", type=int, default=42, help="SEED of every training")
    parser.add_argument(
        "--jobs", type=int, default=1, help="trainings run at once (each with --threads threads)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of every training and measurement (CPU)",
    )
    parser.add_argument(
        "--device", default=None, help="MODEL.DEVICE of every model (default: the configs')"
    )
    parser.add_argument(
        "--images",
        type=int,
        default=298,
        help="shapes_val images timed for inference, after two warm-up ones (at most 298)",
    )
    parser.add_argument("--train-iters", type=int, default=20, help="timed training steps")
    parser.add_argument(
        "--retrain", action="store_true", help="train again even where a model_final.pth exists"
    )
    parser.add_argument(
        "--measure", nargs=3, metavar=("CFG", "WEIGHTS", "JSON"), help=argparse.SUPPRESS
    )  # internal: one model's measurements
    return parser  # fmt: skip


def config_file(key, schedule):
    return f"{MODELS[key][1]}{'_long' if schedule == 'long' else ''}.yaml"


def _env(threads):
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def train(keys, args):
    """Train every model without a model_final.pth, ``args.jobs`` at once; exits naming the
    log of a training that failed."""
    pending = []
    for key in keys:
        run = os.path.join(args.output, key)
        final = os.path.join(run, "model_final.pth")
        if os.path.isfile(final) and not args.retrain:
            print(f"{key}: {final} exists, not trained again (--retrain to do so)")
            continue
        os.makedirs(run, exist_ok=True)
        cmd = [
            sys.executable,
            os.path.join(REPO, "train_net.py"),
            "--config-file",
            os.path.join(REPO, config_file(key, args.schedule)),
        ]
        if os.path.isfile(os.path.join(run, "last_checkpoint")) and not args.retrain:
            cmd.append("--resume")  # an interrupted training continues exactly
        cmd += ["SEED", str(args.seed), "OUTPUT_DIR", run]
        cmd += ["MODEL.DEVICE", args.device] if args.device else []  # fmt: skip
        pending.append((key, cmd, os.path.join(run, "train.out")))
    running = []
    while pending or running:
        while pending and len(running) < max(1, args.jobs):
            key, cmd, log = pending.pop(0)
            print(f"{key}: training, log {log}: {' '.join(cmd)}", flush=True)
            with open(log, "w") as f:
                proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                        env=_env(args.threads))  # fmt: skip
            running.append((key, proc, log, time.time()))
        time.sleep(1)
        for item in list(running):
            key, proc, log, start = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode:
                for _, other, _, _ in running:
                    other.terminate()
                sys.exit(f"{key}: training failed (exit {proc.returncode}); see {log}")
            print(f"{key}: trained in {(time.time() - start) / 60:.1f} min")


def measure(config, weights, out_json, threads, images, train_iters, device):
    """One model's inference s/image, masks per image, training s/iter and peak memory, in this
    process (the command runs it in a fresh one per model)."""
    import torch
    from detectron2.utils.events import EventStorage
    from detectron2.utils.logger import setup_logger

    import maskpyramid  # noqa: F401  (registers datasets and models)
    import scratch_mask_rcnn
    from maskpyramid.config import NUM_CLASSES_KEYS, resolve_num_classes
    from maskpyramid.engine import Trainer, build_cfg, load_checkpoint

    NUM_CLASSES_KEYS.update(scratch_mask_rcnn.NUM_CLASSES_KEYS)
    setup_logger(name="maskpyramid")
    torch.set_num_threads(threads)
    opts = ["OUTPUT_DIR", tempfile.mkdtemp(prefix="compare_models_")]
    cfg = build_cfg(config, opts + (["MODEL.DEVICE", device] if device else []),
                    (scratch_mask_rcnn.add_scratch_mask_rcnn_config,))  # fmt: skip
    resolve_num_classes(cfg)
    cfg.freeze()
    cuda = cfg.MODEL.DEVICE.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    trainer = Trainer(cfg)
    model = trainer.model
    load_checkpoint(model, weights)
    # inference first, on the trained weights (the training steps below change them)
    model.eval()
    loader = Trainer.build_test_loader(cfg, cfg.DATASETS.TEST[0])
    times, masks = [], []
    with torch.no_grad():
        for i, inputs in enumerate(loader):
            if i >= images + 2:
                break
            sync()
            start = time.perf_counter()
            out = model(inputs)[0]["instances"]
            sync()
            if i >= 2:  # two warm-up images
                times.append(time.perf_counter() - start)
                masks.append(int((out.scores > SCORE).sum()))
    inference_peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else math.nan
    model.train()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    steps = []
    with EventStorage(0) as storage:
        for it in range(3 + train_iters):
            storage.iter = trainer.iter = it
            sync()
            start = time.perf_counter()
            trainer.run_step()
            sync()
            if it >= 3:
                steps.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
        where = torch.cuda.get_device_name()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        where = f"{_cpu_name()}, torch threads {torch.get_num_threads()}"
    result = {
        "inference_s": sum(times) / len(times),
        "inference_images": len(times),
        "masks_per_image": sum(masks) / len(masks),
        "train_s_per_iter": sum(steps) / len(steps),
        "train_iters": len(steps),
        "peak_memory_mib": peak,
        "inference_peak_memory_mib": inference_peak,
        "device": where,
    }
    with open(out_json, "w") as f:
        json.dump(result, f)


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or 'CPU'} ({os.cpu_count()} cores)"


def measure_all(keys, args):
    """Each model measured in a fresh process, one after the other."""
    out = {}
    for key in keys:
        run = os.path.join(args.output, key)
        out_json = os.path.join(run, "measurements.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--measure",
               os.path.join(REPO, config_file(key, args.schedule)),
               os.path.join(run, "model_final.pth"), out_json,
               "--threads", str(args.threads), "--images", str(args.images),
               "--train-iters", str(args.train_iters)]  # fmt: skip
        cmd += ["--device", args.device] if args.device else []
        print(f"{key}: measuring inference and training steps", flush=True)
        proc = subprocess.run(cmd, cwd=REPO, env=_env(args.threads), capture_output=True,
                              text=True)  # fmt: skip
        if proc.returncode:
            sys.exit(f"{key}: measuring failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        with open(out_json) as f:
            out[key] = json.load(f)
    return out


def rows_of(keys, args, measured):
    from maskpyramid.engine.runs import last_evaluation, read_metrics, training_summary

    rows = []
    for key in keys:
        run = os.path.join(args.output, key)
        try:
            metrics = read_metrics(run)
            segm = last_evaluation(metrics, "segm", run)
        except (OSError, ValueError) as e:
            sys.exit(str(e))
        summary = training_summary(metrics)
        rows.append({"key": key, "label": MODELS[key][0],
                     "config": config_file(key, args.schedule), "segm": segm,
                     "iterations": summary["iterations"] + 1, "metrics": metrics,
                     "run_peak_memory_mib": summary["peak_memory_mib"],
                     **measured[key]})  # fmt: skip
    return rows


def markdown(rows, args, command) -> str:
    base = rows[-1]  # detectron2's Mask R-CNN, unless --models leaves it out
    head = (
        "| model | segm AP | AP50 | AP75 | APs | APm | APl | bbox AP | train s/iter "
        "| inference s/image | masks/image > 0.05 | peak memory MiB | training run's peak MiB |"
    )
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        s = r["segm"]
        ap = " | ".join(f"{s[m]:.1f}" for m in ("AP", "AP50", "AP75", "APs", "APm", "APl"))
        train = f"{r['train_s_per_iter']:.3f}"
        infer = f"{r['inference_s']:.3f}"
        if r is not base:
            train += f" ({r['train_s_per_iter'] / base['train_s_per_iter']:.2f}x)"
            infer += f" ({r['inference_s'] / base['inference_s']:.2f}x)"
        lines.append(
            f"| {r['label']} (`{r['config']}`) | {ap} | {s['bbox AP']:.1f} | {train} "
            f"| {infer} | {r['masks_per_image']:.1f} | {r['peak_memory_mib']:.0f} "
            f"| {r['run_peak_memory_mib']:.0f} |"
        )
    r0 = rows[0]
    notes = [
        "",
        f"`shapes_val` (300 images), segm / bbox AP of the evaluation that ends each training "
        f"({r0['iterations']} iterations, seed {args.seed}); times and masks per image on "
        f"{r0['inference_images']} images and {r0['train_iters']} training steps (batch 4), "
        f"each model in a process of its own on {r0['device']}; ratios against "
        f"{base['label']}. Peak memory: "
        + ("peak of torch's CUDA allocations in training." if "threads" not in r0["device"]
           else "the measuring process's peak resident set (inference, then training).")
        + " The training run's peak: its `metrics.json`'s `peak_memory_mib` (the Trainer's "
        "`PeakMemory`, the evaluation not included).",
        "",
        f"Generated {datetime.date.today().isoformat()} by `{command}`.",
    ]  # fmt: skip
    return "\n".join(lines + notes) + "\n"


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.measure:
        measure(*args.measure, args.threads, args.images, args.train_iters, args.device)
        return 0
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/compare_models.py"] + list(given))
    keys = [k for k in MODELS if k in args.models]
    train(keys, args)
    rows = rows_of(keys, args, measure_all(keys, args))
    report = args.report or os.path.join(args.output, "comparison")
    os.makedirs(os.path.dirname(os.path.abspath(report)), exist_ok=True)
    text = markdown(rows, args, command)
    with open(f"{report}.md", "w") as f:
        f.write(text)
    from maskpyramid.vis.plots import plot_comparison, plot_training_curves

    plot_comparison(rows, f"{report}.png")
    curves = {r["label"]: r["metrics"] for r in rows}
    plot_training_curves(curves, f"{report}_curves.png", smooth=5)
    print(text)
    print(f"wrote {report}.md, {report}.png and {report}_curves.png (the runs' training curves)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
