#!/usr/bin/env python
"""Build a pure-Python detectron2 0.6 wheel from the ``pb1-detectron2==0.6`` sdist on PyPI.

That sdist is upstream v0.6's Python source without ``layers/csrc``, so it cannot be built as
published (its setup.py compiles the extension, finds no model-zoo configs and would install a
stray top-level ``tools`` package). This script:

1. downloads the sdist with pip (cached under ``build/``) and checks its sha256;
2. applies :data:`maskpyramid.compat.SOURCE_FIXES` and writes the ``_C`` stand-in;
3. writes its own small setup.py: package ``detectron2`` (+ the PointRend, DeepLab and
   Panoptic-DeepLab projects under ``detectron2.projects`` as upstream does), model-zoo configs
   included, no extension, and builds the wheel.

Usage: python tools/build_detectron2.py --out build/wheels
"""

import argparse
import hashlib
import importlib.util
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "pb1-detectron2==0.6"
SDIST_FILE = "pb1-detectron2-0.6.tar.gz"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
VERSION = "0.6+purepython"
REPO = Path(__file__).resolve().parents[1]

SETUP_PY = """\
from setuptools import setup, find_packages

PROJECTS = {
    "detectron2.projects.point_rend": "projects/PointRend/point_rend",
    "detectron2.projects.deeplab": "projects/DeepLab/deeplab",
    "detectron2.projects.panoptic_deeplab": "projects/Panoptic-DeepLab/panoptic_deeplab",
}
setup(
    name="detectron2",
    version="%(version)s",
    description="detectron2 v0.6 (pure-Python build of pb1-detectron2==0.6 by maskpyramid)",
    url="https://github.com/facebookresearch/detectron2",
    license="Apache-2.0",
    packages=find_packages(include=["detectron2", "detectron2.*"]) + list(PROJECTS),
    package_dir=PROJECTS,
    package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]},
    python_requires=">=3.8",
    install_requires=[
        "Pillow>=7.1", "matplotlib", "pycocotools>=2.0.2", "termcolor>=1.1", "yacs>=0.1.8",
        "tabulate", "cloudpickle", "tqdm>4.29.0", "tensorboard", "fvcore>=0.1.5,<0.1.6",
        "iopath>=0.1.7,<0.1.10", "omegaconf>=2.1", "hydra-core>=1.1",
    ],
)
"""


def load_compat():
    """Load maskpyramid/compat.py by path: maskpyramid itself needs detectron2 to import."""
    spec = importlib.util.spec_from_file_location("_compat", REPO / "maskpyramid" / "compat.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def fetch_sdist(cache: Path) -> Path:
    path = cache / SDIST_FILE
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        # --no-build-isolation: the sdist's setup.py imports torch just to print its metadata
        subprocess.check_call(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--no-build-isolation", "--no-binary", ":all:", SDIST, "-d", str(cache)]
        )  # fmt: skip
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        path.unlink()
        raise RuntimeError(f"{SDIST_FILE}: sha256 {digest} != expected {SDIST_SHA256}")
    return path


def build_wheel(out: Path, cache: Path) -> Path:
    compat = load_compat()
    sdist = fetch_sdist(cache)
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = Path(tmp) / "pb1-detectron2-0.6"
        for line in compat.apply_source_fixes(src):
            print("  fixed", line)
        for name in ("setup.py", "setup.cfg", "pb1_detectron2.egg-info", "tools"):
            target = src / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        (src / "setup.py").write_text(SETUP_PY % {"version": VERSION})
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("detectron2-*.whl"):
            old.unlink()
        subprocess.check_call(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
             "--no-build-isolation", str(src), "-w", str(out)]
        )  # fmt: skip
    (wheel,) = out.glob("detectron2-*.whl")
    return wheel


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "build" / "wheels")
    parser.add_argument("--cache", type=Path, default=REPO / "build" / "sdist")
    args = parser.parse_args()
    print(build_wheel(args.out, args.cache))


if __name__ == "__main__":
    main()
