"""Image files named on a command line: files, glob patterns and folders (demo.py, the viewer)."""

import glob
import os
from typing import List, Sequence

__all__ = ["IMAGE_EXTENSIONS", "expand_inputs", "output_names"]

# what a folder or a pattern contributes (compared lower-cased)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def expand_inputs(inputs: Sequence[str]) -> List[str]:
    """The image files of ``inputs`` (files, glob patterns, folders), duplicates removed.

    Raises:
        ValueError: an input that matches no image (an empty folder, a pattern matching no image
            file, a missing file), naming it.
    """
    paths, seen = [], set()
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(item, f)
                for f in os.listdir(item)
                if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(item, f))
            )
            if not found:
                raise ValueError(f"folder {item} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
        elif glob.has_magic(item):
            found = sorted(
                p
                for p in glob.glob(item)
                if os.path.isfile(p) and p.lower().endswith(IMAGE_EXTENSIONS)
            )
            if not found:
                raise ValueError(f"no image file matches {item}")
        elif os.path.isfile(item):
            found = [item]
        else:
            raise ValueError(f"no such image file or folder: {item}")
        for path in found:
            key = os.path.realpath(path)
            if key not in seen:
                seen.add(key)
                paths.append(path)
    return paths


def output_names(paths: Sequence[str]) -> List[str]:
    """``<stem>.png`` per path; a stem seen before gets the first free ``_1``, ``_2``, ..."""
    names, used = [], set()
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        name, n = f"{stem}.png", 0
        while name in used:
            n += 1
            name = f"{stem}_{n}.png"
        used.add(name)
        names.append(name)
    return names
