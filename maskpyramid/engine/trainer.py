"""``Trainer``: detectron2's ``DefaultTrainer`` with what a long CPU or GPU run needs.

Differences from ``DefaultTrainer``, each one small:
- DDP also on CPU (``device_ids=None``; v0.6 passes a GPU index whatever the device);
- COCO evaluation (bbox, and segm when the model predicts masks) for every test set;
- checkpoints written atomically (:class:`AtomicCheckpointer`), with the optimizer state, which
  v0.6's ``DefaultTrainer`` leaves out (so its ``--resume`` restarts momentum from zero);
- ``--resume`` continues exactly: the data stream resumes at its position with the same
  augmentation (:mod:`maskpyramid.data.sampling`), the model's own randomness (e.g. RoI
  sampling) is seeded per iteration (:class:`IterationSeed`), optimizer and scheduler come back;
- images that cannot be read raise an error naming the file (:class:`CheckedDatasetMapper`);
- the process's peak memory goes to ``metrics.json`` as ``peak_memory_mib`` (:class:`PeakMemory`).
"""

import logging
import os
import resource
import weakref

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import (
    DatasetCatalog,
    MapDataset,
    build_detection_test_loader,
    get_detection_dataset_dicts,
)
from detectron2.data.build import build_batch_data_loader
from detectron2.data.common import DatasetFromList
from detectron2.engine import AMPTrainer, DefaultTrainer, HookBase, SimpleTrainer, TrainerBase
from detectron2.evaluation import COCOEvaluator
from detectron2.solver.build import _generate_optimizer_class_with_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from ..data.mapper import CheckedDatasetMapper, MaskPyramidDatasetMapper
from ..data.sampling import PositionedDataset, ResumableTrainingSampler, SeededMapper

__all__ = ["AtomicCheckpointer", "IterationSeed", "PeakMemory", "Trainer", "create_ddp_model"]


def _atomic_write(path: str, write) -> None:
    """Write a file through ``write(f)`` so that ``path`` is either the old or the new file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class AtomicCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose checkpoint and ``last_checkpoint`` tag are atomic writes.

    fvcore writes both in place: a crash or a full disk while saving leaves a truncated
    ``model_final.pth`` or an empty ``last_checkpoint``, and ``--resume`` then fails or starts over.
    Here both go to a temporary file that replaces the target only once complete.
    """

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        _atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, "last_checkpoint")
        _atomic_write(path, lambda f: f.write(last_filename_basename.encode()))


def create_ddp_model(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """Wrap in DDP when there are several processes; works for CPU and CUDA models."""
    if comm.get_world_size() == 1:
        return model
    if "device_ids" not in kwargs:
        on_cuda = next(model.parameters()).is_cuda
        kwargs["device_ids"] = [comm.get_local_rank()] if on_cuda else None
    return DistributedDataParallel(model, **kwargs)


class IterationSeed(HookBase):
    """Seeds torch's RNG from ``(seed, iteration, rank)`` before every step.

    The model's random choices (e.g. which anchors and RoIs are sampled) then depend on the
    iteration only, so a resumed run draws what the uninterrupted run drew, without RNG state in
    the checkpoint.
    """

    def __init__(self, seed: int):
        self.seed = int(seed)

    def before_step(self):
        state = np.random.SeedSequence([self.seed, self.trainer.iter, comm.get_rank()])
        torch.manual_seed(int(state.generate_state(1)[0]))


class PeakMemory(HookBase):
    """Puts ``peak_memory_mib`` into the ``EventStorage`` after every step: the largest GPU
    memory torch has allocated on a CUDA model, else the process's peak resident set size
    (main process; the data-loader workers are not counted)."""

    def after_step(self):
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        self.trainer.storage.put_scalar("peak_memory_mib", peak, smoothing_hint=False)


class Trainer(DefaultTrainer):
    """Trains and evaluates any registered meta-architecture; see the module docstring."""

    def __init__(self, cfg):
        # DefaultTrainer.__init__, with create_ddp_model and AtomicCheckpointer of this module
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(
            model,
            broadcast_buffers=False,
            # MaskPyramid: which heads get a gradient depends on the batch (no positive on a
            # level, staged levels, the unused grow head of the first level)
            find_unused_parameters=getattr(model, "has_unused_parameters", False),
        )
        trainer_cls = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        self._trainer = trainer_cls(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_train_loader(self, cfg):
        """detectron2's train loader, on the resumable, position-seeded stream."""
        dicts = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=(
                cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0
            ),
        )
        seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
        self._train_mapper = SeededMapper(self.build_train_mapper(cfg), seed)
        self._train_sampler = ResumableTrainingSampler(
            len(dicts), seed, total_batch_size=cfg.SOLVER.IMS_PER_BATCH
        )
        dataset = MapDataset(
            PositionedDataset(DatasetFromList(dicts, copy=True)), self._train_mapper
        )
        return build_batch_data_loader(
            dataset,
            self._train_sampler,
            cfg.SOLVER.IMS_PER_BATCH,
            aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
            num_workers=cfg.DATALOADER.NUM_WORKERS,
        )

    @classmethod
    def build_optimizer(cls, cfg, model):
        """detectron2's optimizer. Per-parameter gradient clipping by value (SOLVER.CLIP_GRADIENTS,
        CLIP_TYPE "value") skips parameters that got no gradient this step: torch's
        ``clip_grad_value_`` fails on them, and a model whose heads depend on the batch has
        some (MaskPyramid: a level without pyramids). Clipping by norm (CLIP_TYPE "norm",
        MaskPyramid's shapes configs) is detectron2's own: ``clip_grad_norm_`` skips them."""
        clip = cfg.SOLVER.CLIP_GRADIENTS
        if not (clip.ENABLED and clip.CLIP_TYPE == "value"):
            return super().build_optimizer(cfg, model)
        cfg = cfg.clone()
        cfg.defrost()
        cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False
        optimizer = super().build_optimizer(cfg, model)
        value = clip.CLIP_VALUE

        def clip_value(p):
            if p.grad is not None:
                torch.nn.utils.clip_grad_value_(p, value)

        optimizer.__class__ = _generate_optimizer_class_with_gradient_clipping(
            type(optimizer), per_param_clipper=clip_value
        )
        return optimizer

    @classmethod
    def build_train_mapper(cls, cfg):
        """The per-image training mapper; MaskPyramid's also prepares its per-level targets."""
        if cfg.MODEL.META_ARCHITECTURE == "MaskPyramid":
            return MaskPyramidDatasetMapper(cfg, is_train=True)
        return CheckedDatasetMapper(cfg, is_train=True)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=CheckedDatasetMapper(cfg, is_train=False)
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        # COCOEvaluator's category-id mapping is filled by loading the dataset; evaluating before
        # that gives silently wrong AP.
        DatasetCatalog.get(dataset_name)
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, tasks=tasks, distributed=True, output_dir=output_folder)

    def build_hooks(self):
        return [IterationSeed(self._train_sampler.seed), PeakMemory()] + super().build_hooks()

    def state_dict(self):
        ret = super().state_dict()
        # v0.6 checkpoints lack the optimizer (and AMP grad scaler): upstream added "_trainer"
        ret["_trainer"] = self._trainer.state_dict()
        ret["data_seed"] = self._train_sampler.seed
        return ret

    def load_state_dict(self, state_dict):
        TrainerBase.load_state_dict(self, state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        if "data_seed" in state_dict:
            seed = state_dict["data_seed"]
            self._train_sampler.seed = self._train_mapper.seed = seed
            for hook in self._hooks:
                if isinstance(hook, IterationSeed):
                    hook.seed = seed

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        if self.start_iter > 0:
            # SimpleTrainer started iterating the loader in __init__; restart it where the
            # checkpointed run stopped.
            self._train_sampler.start_iter = self.start_iter
            self._trainer._data_loader_iter = None
            self._trainer._data_loader_iter = iter(self._trainer.data_loader)
