"""setup.cfg lists its packages one by one (the scratch project sits under projects/): every
package directory of the repository must be listed, or a non-editable install would miss it."""

import configparser
import os

from tests.conftest import REPO


def _listed():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    packages = cfg["options"]["packages"].split()
    dirs = {"": "."}
    for line in cfg["options"]["package_dir"].strip().splitlines():
        name, path = (s.strip() for s in line.split("="))
        dirs[name] = path
    return packages, dirs


def _package_dirs(root):
    for path, _, files in os.walk(os.path.join(REPO, root)):
        if "__init__.py" in files and "__pycache__" not in path:
            yield os.path.relpath(path, REPO)


def test_every_package_is_listed_in_setup_cfg():
    packages, dirs = _listed()
    expected = set()
    for path in _package_dirs("maskpyramid"):
        expected.add(path.replace(os.sep, "."))
    for name, root in dirs.items():
        if name:
            for path in _package_dirs(root):
                expected.add(name + path[len(os.path.normpath(root)) :].replace(os.sep, "."))
    assert set(packages) == expected


def test_listed_packages_import():
    import importlib

    for name in _listed()[0]:
        importlib.import_module(name)
