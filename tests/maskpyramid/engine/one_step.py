"""Two optimizer steps of a small deterministic model through maskpyramid's launch and Trainer.

Usage: python one_step.py NUM_PROCESSES DATA_ROOT OUTPUT_DIR [NUM_MACHINES MACHINE_RANK DIST_URL]
Used by test_launch.py: N processes and 1 process, same total batch and seed, must end with the
same parameters. (Mask R-CNN itself is not such a model: its RoI sampling is random per process
and its mask loss is averaged over a number of RoIs that differs between processes.)
With ONE_STEP_MODEL=MaskPyramid it trains a tiny MaskPyramid instead (with gradient clipping by
value), whose heads get gradients depending on the batch.
"""

import os
import sys

import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.layers import NaiveSyncBatchNorm
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from torch import nn

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
sys.path.insert(0, REPO)
from maskpyramid.config import add_maskpyramid_config, resolve_num_classes  # noqa: E402
from maskpyramid.data.shapes import register_shapes  # noqa: E402
from maskpyramid.engine import Trainer, launch  # noqa: E402
from tests.conftest import TINY_SPEC, TINY_SPLITS  # noqa: E402


@META_ARCH_REGISTRY.register()
class OneStepNet(nn.Module):
    """Per-pixel foreground logits; the loss is a mean over images of per-image means."""

    def __init__(self, cfg):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            NaiveSyncBatchNorm(8),  # batch statistics over all processes
            nn.ReLU(),
            nn.Conv2d(8, 1, 3, padding=1),
        )
        self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1), False)

    def forward(self, batched_inputs):
        images = torch.stack(
            [(x["image"] - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        )
        targets = torch.stack(
            [x["instances"].gt_masks.tensor.any(0).float() for x in batched_inputs]
        )
        logits = self.body(images)[:, 0]
        per_image = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        return {"loss_foreground": per_image.mean((1, 2)).mean()}


def run(root, output_dir):
    register_shapes(root, TINY_SPEC, TINY_SPLITS)
    cfg = get_cfg()
    add_maskpyramid_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", "Base-Shapes.yaml"))
    cfg.merge_from_list([
        "MODEL.META_ARCHITECTURE", "OneStepNet", "MODEL.DEVICE", "cpu", "MODEL.MASK_ON", True,
        "DATASETS.TRAIN", ("tiny_shapes_train",), "DATASETS.TEST", (),
        "INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", 64, "DATALOADER.NUM_WORKERS", 0,
        "SOLVER.IMS_PER_BATCH", 4, "SOLVER.BASE_LR", 0.5, "SOLVER.WARMUP_ITERS", 0,
        "SOLVER.MAX_ITER", 2, "SOLVER.STEPS", (), "SEED", 7, "OUTPUT_DIR", output_dir,
    ])  # fmt: skip
    if os.environ.get("ONE_STEP_MODEL") == "MaskPyramid":
        from tests.maskpyramid.modeling.test_meta_arch import TINY

        cfg.merge_from_file(os.path.join(REPO, "configs", "shapes", "mask_pyramid_R_18_FPN.yaml"))
        cfg.merge_from_list(TINY + [
            "SOLVER.BASE_LR", 0.01, "SOLVER.MAX_ITER", 2, "SOLVER.STEPS", (),
            "SOLVER.WARMUP_ITERS", 0, "SOLVER.CLIP_GRADIENTS.ENABLED", True,
            "MODEL.MASK_PYRAMID.READOUT_FEATURES", ["p2"],
        ])  # fmt: skip
        resolve_num_classes(cfg)
    cfg.freeze()
    with open(os.path.join(output_dir, f"rank{comm.get_rank()}_of_{comm.get_world_size()}"), "w"):
        pass
    seed_all_rng(cfg.SEED + comm.get_rank())  # as default_setup does; DDP broadcasts rank 0's init
    Trainer(cfg).train()


if __name__ == "__main__":
    num_processes, root, output_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    num_machines, machine_rank, dist_url = 1, 0, "auto"
    if len(sys.argv) > 4:
        num_machines, machine_rank, dist_url = int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
    os.makedirs(output_dir, exist_ok=True)
    launch(run, num_processes, num_machines, machine_rank, dist_url, args=(root, output_dir))
