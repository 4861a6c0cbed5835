"""Multi-process training on CPU (gloo): 2 processes give what 1 process gives."""

import os
import subprocess
import sys

import torch

SCRIPT = os.path.join(os.path.dirname(__file__), "one_step.py")


def _train(num_processes, root, output_dir):
    proc = subprocess.run(
        [sys.executable, SCRIPT, str(num_processes), root, str(output_dir)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(output_dir / "model_final.pth", map_location="cpu", weights_only=False)


def test_two_cpu_processes_equal_one_process(tiny_shapes, tmp_path):
    one = _train(1, tiny_shapes, tmp_path / "one")
    two = _train(2, tiny_shapes, tmp_path / "two")
    assert sorted(os.listdir(tmp_path / "two"))[-2:] == ["rank0_of_2", "rank1_of_2"]
    assert one["iteration"] == two["iteration"] == 1
    for key, value in one["model"].items():
        if key.endswith("num_batches_tracked"):  # NaiveSyncBatchNorm does not count across ranks
            continue
        torch.testing.assert_close(two["model"][key], value, rtol=0, atol=1e-5, msg=key)
    assert not torch.equal(one["model"]["body.1.running_mean"], torch.zeros(8))
