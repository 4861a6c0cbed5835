#!/usr/bin/env python
"""Train and evaluate MaskPyramid, the from-scratch Mask R-CNN or detectron2's own models.

Same command line as detectron2's tools/train_net.py, plus ``--register-coco NAME JSON IMAGE_ROOT``.
``--num-gpus N`` runs N processes: on GPUs with NCCL, on a CPU machine with gloo.
"""

from detectron2.evaluation import verify_results
from detectron2.utils import comm

import maskpyramid  # noqa: F401  (registers datasets and models)
import scratch_mask_rcnn  # registers ScratchMaskRCNN
from maskpyramid.config import NUM_CLASSES_KEYS
from maskpyramid.engine import (
    AtomicCheckpointer,
    Trainer,
    argument_parser,
    launch,
    register_datasets_from_args,
    setup,
)

# the projects' config keys, and where their models read the number of classes
ADD_CONFIGS = (scratch_mask_rcnn.add_scratch_mask_rcnn_config,)
NUM_CLASSES_KEYS.update(scratch_mask_rcnn.NUM_CLASSES_KEYS)


def main(args):
    cfg = setup(args, ADD_CONFIGS)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = argument_parser().parse_args()
    register_datasets_from_args(args)  # bad paths fail now, before processes are started
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
