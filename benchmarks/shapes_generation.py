#!/usr/bin/env python
"""Time the generation of the embedded `shapes` dataset (the issue's bound: under a minute).

Generates into a temporary folder (never touching datasets/), prints the time and statistics.
Usage: python benchmarks/shapes_generation.py [--workers N]
"""

import argparse
import json
import os
import tempfile
import time
from collections import Counter

from maskpyramid.data.shapes import SPLITS, THING_CLASSES, ensure_shapes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=None, help="default: one per core")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        paths = ensure_shapes(root, num_workers=args.workers)
        seconds = time.perf_counter() - start
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
        print(f"generated {sum(n for _, n in SPLITS.values())} images in {seconds:.1f} s "
              f"({size / 2**20:.0f} MiB) on {os.cpu_count()} cores")  # fmt: skip
        for name, (json_file, _) in paths.items():
            data = json.load(open(json_file))
            anns = data["annotations"]
            areas = Counter(
                "small" if a["area"] < 32**2 else "medium" if a["area"] < 96**2 else "large"
                for a in anns
            )
            per_class = Counter(THING_CLASSES[a["category_id"] - 1] for a in anns)
            bins = ", ".join(
                f"{k} {areas[k] / len(anns):.0%}" for k in ("small", "medium", "large")
            )
            classes = ", ".join(f"{c} {n}" for c, n in sorted(per_class.items()))
            print(f"{name}: {len(data['images'])} images, {len(anns)} instances "
                  f"({len(anns) / len(data['images']):.2f}/image); {bins}; {classes}")  # fmt: skip


if __name__ == "__main__":
    main()
