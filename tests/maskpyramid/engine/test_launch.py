"""Multi-process training on CPU (gloo): 2 processes give what 1 process gives."""

import os
import subprocess
import sys

import pytest
import torch
from detectron2.engine.launch import _find_free_port

SCRIPT = os.path.join(os.path.dirname(__file__), "one_step.py")


def _train(num_processes, root, output_dir, *machine, env=None):
    proc = subprocess.run(
        [sys.executable, SCRIPT, str(num_processes), root, str(output_dir), *machine],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(output_dir / "model_final.pth", map_location="cpu", weights_only=False)


def _assert_same_weights(one, two):
    assert one["iteration"] == two["iteration"] == 1
    for key, value in one["model"].items():
        if key.endswith("num_batches_tracked"):  # NaiveSyncBatchNorm does not count across ranks
            continue
        torch.testing.assert_close(two["model"][key], value, rtol=0, atol=1e-5, msg=key)
    assert not torch.equal(one["model"]["body.1.running_mean"], torch.zeros(8))


@pytest.fixture(scope="module")
def one_process(tiny_shapes, tmp_path_factory):
    return _train(1, tiny_shapes, tmp_path_factory.mktemp("one"))


def test_two_cpu_processes_equal_one_process(one_process, tiny_shapes, tmp_path):
    two = _train(2, tiny_shapes, tmp_path)
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("rank")) == [
        "rank0_of_2",
        "rank1_of_2",
    ]
    _assert_same_weights(one_process, two)


def test_two_machines_of_one_process_equal_one_process(one_process, tiny_shapes, tmp_path):
    port = _find_free_port()
    url = f"tcp://127.0.0.1:{port}"
    cmd = [sys.executable, SCRIPT, "1", tiny_shapes, str(tmp_path), "2", "1", url]
    # machine 1's stderr goes to a file (about 2 KB): an unread pipe could block it if it ever
    # wrote more than the pipe holds, and the file keeps the whole log for a failure message
    log = tmp_path / "machine1.stderr"
    with open(log, "w") as stderr:
        machine1 = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        try:
            two = _train(1, tiny_shapes, tmp_path, "2", "0", url)
            assert machine1.wait(timeout=120) == 0, log.read_text()[-3000:]
        finally:
            machine1.kill()
    _assert_same_weights(one_process, two)


def test_mask_pyramid_trains_in_two_processes_with_gradient_clipping(tiny_shapes, tmp_path):
    """Some of MaskPyramid's heads get no gradient in a step (the first level's grow head, a
    level without pyramids): DDP must be told, and clipping by value must skip them."""
    env = dict(os.environ, ONE_STEP_MODEL="MaskPyramid")
    two = _train(2, tiny_shapes, tmp_path, env=env)
    assert two["iteration"] == 1
    assert any(k.startswith("grow_heads.") for k in two["model"])
