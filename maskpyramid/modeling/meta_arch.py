"""MaskPyramid: backbone -> growth, coarse to fine -> pyramids -> painting -> ``Instances``.

Reading order: ``forward`` -> ``grow`` (one ``_level`` per FPN level: grow the pyramids that
survive, spawn new roots, give them masks, prune, cap) -> ``losses`` or ``inference``.
"""

import dataclasses
import functools
import logging
import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.layers import ROIAlign
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes, ImageList
from detectron2.structures.boxes import matched_pairwise_iou
from detectron2.utils.events import get_event_storage
from torch import nn
from torch.nn import functional as F

from . import growth as G
from .heads import (
    PooledBoxHead,
    PooledClassHead,
    PyramidMaskHead,
    RefineHead,
    ScoreHead,
    SemSegHead,
)
from .inference import NMS_MASKS, NMS_MODES, mask_iou_matrix, paste_in_image, pyramids_to_instances
from .losses import (
    MASK_LOSSES,
    dense_class_loss,
    dice_loss,
    mask_iou,
    per_pyramid_mask_loss,
    territory_penalty,
)
from .position import offset_channels, position_channels, window_cell_centres
from .targets import feature_strides

__all__ = ["MaskPyramid", "LevelRecord"]

logger = logging.getLogger(__name__)


@dataclass
class LevelRecord:
    """What one level of growth did (for losses, the debugging view and the counters)."""

    name: str  # FPN level the masks live on
    level: int  # index into IN_FEATURES (of the mask grid)
    stride: int
    pyramids: G.Pyramids  # the survivors, after pruning and caps
    spawned: torch.Tensor  # (S, 3) batch, row, col of the roots spawned here
    uncovered: Optional[torch.Tensor]  # (B, H, W) bool, before spawning ("uncovered" modes)
    num_pruned: torch.Tensor  # (B,) pyramids pruned or capped here, per image
    pruned_masks: Optional[torch.Tensor] = None  # (P, H, W) logits, when record_pruned is set
    pruned_batch: Optional[torch.Tensor] = None


def _pooled_levels(mp, key: str, shapes):
    """The FPN levels a pooled head reads (``MODEL.MASK_PYRAMID.<key>``): names and strides;
    a name that is not a backbone output, or levels that are not consecutive, name the key."""
    names = list(mp[key])
    for f in names:
        if f not in shapes:
            raise ValueError(
                f"MODEL.MASK_PYRAMID.{key}: '{f}' is not a backbone output ({sorted(shapes)})"
            )
    strides = [shapes[f].stride for f in names]
    levels = [int(math.log2(s)) for s in strides]
    if not names or levels != list(range(levels[0], levels[0] + len(levels))):
        raise ValueError(
            f"MODEL.MASK_PYRAMID.{key} must be consecutive FPN levels, got {names} (strides "
            f"{strides})"
        )
    return names, strides


@META_ARCH_REGISTRY.register()
class MaskPyramid(nn.Module):
    """Anchor-free, box-free instance segmentation by growing mask pyramids on an FPN."""

    # which heads get a gradient depends on the batch (DDP's find_unused_parameters)
    has_unused_parameters = True

    @configurable
    def __init__(
        self,
        *,
        backbone,
        in_features: List[str],
        readout_features: List[str],
        num_classes: int,
        pixel_mean,
        pixel_std,
        mp,  # the MODEL.MASK_PYRAMID node (every knob is read from it once, here)
        vis_period: int = 0,
        input_format: str = "BGR",
    ):
        super().__init__()
        self.backbone = backbone
        # training-time images (VIS_PERIOD): predicted vs target pyramid masks per level
        self.vis_period = int(vis_period)
        self.input_format = input_format
        self.in_features = list(in_features)  # root levels: pyramids spawn and grow
        self.readout_features = list(readout_features)  # finer levels: pyramids only grow
        self.mask_features = self.in_features + self.readout_features
        shapes = backbone.output_shape()
        for key, names in (
            ("IN_FEATURES", self.in_features),
            ("READOUT_FEATURES", self.readout_features),
        ):
            for f in names:
                if f not in shapes:
                    raise ValueError(
                        f"MODEL.MASK_PYRAMID.{key}: '{f}' is not a backbone output "
                        f"({sorted(shapes)})"
                    )
        self.strides = feature_strides(self.mask_features, "IN_FEATURES + READOUT_FEATURES")
        for f, s in zip(self.mask_features, self.strides):
            if shapes[f].stride != s:
                raise ValueError(f"backbone level {f} has stride {shapes[f].stride}, not {s}")
        channels = shapes[self.in_features[0]].channels
        self.num_classes = num_classes
        self.growth = bool(mp.GROWTH)
        n_levels = len(self.mask_features)
        self.n_root = len(self.in_features)
        # levels grown at inference: READOUT_TEST False stops at the last root level
        self.test_levels = n_levels if mp.READOUT_TEST else self.n_root
        self.stage_iters = list(mp.STAGE_ITERS) or [0] * n_levels
        self.level_weights = list(mp.LEVEL_LOSS_WEIGHTS) or [1.0] * n_levels
        for key, value in (
            ("STAGE_ITERS", self.stage_iters),
            ("LEVEL_LOSS_WEIGHTS", self.level_weights),
        ):
            if len(value) != n_levels:
                raise ValueError(
                    f"MODEL.MASK_PYRAMID.{key} needs one value per level of IN_FEATURES + "
                    f"READOUT_FEATURES ({n_levels}), got {value}"
                )
        choices = {
            "SPAWN_MODE": ("peaks", "uncovered", "both"),
            "FIRST_LEVEL_ROOTS": ("all", "peaks"),
            "HEAD_SHARING": ("level", "shared"),
            "SCORE_MODE": ("root", "maskiou"),
            "CLASS_HEAD": ("root", "pooled"),
            "MASK_LOSS": MASK_LOSSES,
            "NMS": NMS_MODES,
            "NMS_MASKS": NMS_MASKS,
        }
        for key, allowed in choices.items():
            if mp[key] not in allowed:
                raise ValueError(
                    f"MODEL.MASK_PYRAMID.{key} must be one of {allowed}, got {mp[key]}"
                )
        for key in ("WINDOW_SAMPLING_RATIO", "CLASS_POOL_SAMPLING_RATIO", "REFINE_SAMPLING_RATIO"):
            if mp[key] < 0:
                raise ValueError(
                    f"MODEL.MASK_PYRAMID.{key} must be >= 0 (0: adaptive), got {mp[key]}"
                )
        if mp.EXTRA_CHANNELS not in (1, 2, 3):
            raise ValueError(
                f"MODEL.MASK_PYRAMID.EXTRA_CHANNELS must be 1, 2 or 3, got {mp.EXTRA_CHANNELS}"
            )
        if mp.POSITION_MODE == "concat" and mp.INIT_CONVS < 2:
            raise ValueError(
                "MODEL.MASK_PYRAMID.INIT_CONVS must be >= 2 with POSITION_MODE concat: with one "
                "layer after the position channel joins, every pyramid gets the same mask"
            )
        if len(mp.START_GRID) not in (0, 2):
            raise ValueError(
                f"MODEL.MASK_PYRAMID.START_GRID must be [] or [rows, cols], got {mp.START_GRID}"
            )
        self.mp = mp
        self.spawn_mode = mp.SPAWN_MODE
        self.window = int(mp.WINDOW_SIZE)
        self.window_sampling = int(mp.WINDOW_SAMPLING_RATIO)
        self.extra = int(mp.EXTRA_CHANNELS)
        self.offsets = float(mp.POSITION_OFFSETS)
        n_extra = self.extra + (2 if self.offsets > 0 else 0)

        # SCORE_MODE "maskiou": the IoU is predicted by the pooled class head when there is one
        # (it sees the pyramid's mask), else by the dense score head at the root
        self.pooled_maskiou = mp.SCORE_MODE == "maskiou" and mp.CLASS_HEAD == "pooled"
        self.score_head = ScoreHead(
            channels,
            num_classes,
            mp.SCORE_CONVS,
            mp.SCORE_MODE == "maskiou" and not self.pooled_maskiou,
        )
        out_ch = num_classes if mp.CLASS_SPECIFIC_MASKS else 1
        shared = mp.HEAD_SHARING == "shared"

        def head(convs, extra):
            return PyramidMaskHead(
                channels,
                mp.HEAD_CHANNELS,
                convs,
                extra,
                mp.POSITION_MODE,
                out_ch,
                mp.GROW_SKIP,
                mp.FEATURE_CONVS,
                mp.TOWER_CHANNELS,
            )

        # one init head per root level, one grow head per level (that of the first level is not
        # used: nothing grows into it), or one of each shared by all levels
        self.init_heads = nn.ModuleList(
            head(mp.INIT_CONVS, n_extra) for _ in range(1 if shared else self.n_root)
        )
        # the grow head also sees the pyramid's upsampled mask (probability)
        self.grow_heads = nn.ModuleList(
            head(mp.GROW_CONVS, n_extra + 1) for _ in range(1 if shared else n_levels)
        )
        self.class_head = None
        if mp.CLASS_HEAD == "pooled":
            self.class_features, class_strides = _pooled_levels(mp, "CLASS_POOL_FEATURES", shapes)
            self.class_head = PooledClassHead(
                shapes[self.class_features[0]].channels,
                class_strides,
                num_classes + int(mp.CLASS_BACKGROUND),
                mp.CLASS_POOL_RESOLUTION,
                mp.CLASS_NUM_CONV,
                mp.CLASS_CONV_DIM,
                mp.CLASS_NUM_FC,
                mp.CLASS_FC_DIM,
                maskiou=self.pooled_maskiou,
                sampling_ratio=mp.CLASS_POOL_SAMPLING_RATIO,
                box_deltas=mp.REFINE_BOX_REGRESSION and mp.BOX_REG_HEAD == "detached",
            )
        self.refine_head = None
        if mp.REFINE_CLASS_SPECIFIC and mp.REFINE_RESOLUTION <= 0:
            raise ValueError(
                "MODEL.MASK_PYRAMID.REFINE_CLASS_SPECIFIC gives the refinement one mask per class: "
                "it needs REFINE_RESOLUTION > 0"
            )
        if mp.REFINE_RESOLUTION > 0:
            self.refine_features, strides = _pooled_levels(mp, "REFINE_FEATURES", shapes)
            self.refine_head = RefineHead(
                shapes[self.refine_features[0]].channels,
                strides,
                mp.REFINE_RESOLUTION,
                mp.REFINE_CONVS,
                mp.REFINE_CHANNELS,
                mp.REFINE_RESIDUAL,
                sampling_ratio=mp.REFINE_SAMPLING_RATIO,
                num_classes=num_classes if mp.REFINE_CLASS_SPECIFIC else 1,
            )
        self.box_transform = None
        if mp.REFINE_BOX_REGRESSION:
            if self.class_head is None or self.refine_head is None:
                raise ValueError(
                    "MODEL.MASK_PYRAMID.REFINE_BOX_REGRESSION regresses the refinement's box with "
                    "the pooled class head: it needs CLASS_HEAD 'pooled' and REFINE_RESOLUTION > 0"
                )
            self.box_transform = Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0))
        if mp.BOX_REG_HEAD not in ("detached", "own"):
            raise ValueError(
                "MODEL.MASK_PYRAMID.BOX_REG_HEAD must be 'detached' or 'own', got "
                f"{mp.BOX_REG_HEAD!r}"
            )
        if mp.BOX_REG_CONTEXT < 0:
            raise ValueError(
                f"MODEL.MASK_PYRAMID.BOX_REG_CONTEXT must be >= 0, got {mp.BOX_REG_CONTEXT}"
            )
        self.box_head = None
        if self.box_transform is not None and mp.BOX_REG_HEAD == "own":
            self.box_head = PooledBoxHead(
                shapes[self.class_features[0]].channels,
                class_strides,  # the class head's levels
                mp.CLASS_POOL_RESOLUTION,
                mp.CLASS_NUM_CONV,
                mp.CLASS_CONV_DIM,
                sampling_ratio=mp.CLASS_POOL_SAMPLING_RATIO,
            )
        if mp.REFINE_BOX not in ("union", "regressed"):
            raise ValueError(
                "MODEL.MASK_PYRAMID.REFINE_BOX must be 'union' or 'regressed', got "
                f"{mp.REFINE_BOX!r}"
            )
        if mp.REFINE_PASSES < 1:
            raise ValueError(
                f"MODEL.MASK_PYRAMID.REFINE_PASSES must be >= 1, got {mp.REFINE_PASSES}"
            )
        if mp.READOUT_GROW_MAX_SIZE < 0:
            raise ValueError(
                "MODEL.MASK_PYRAMID.READOUT_GROW_MAX_SIZE must be >= 0, got "
                f"{mp.READOUT_GROW_MAX_SIZE}"
            )
        if mp.REFINE_PASS_MIN_SIZE < 0:
            raise ValueError(
                "MODEL.MASK_PYRAMID.REFINE_PASS_MIN_SIZE must be >= 0, got "
                f"{mp.REFINE_PASS_MIN_SIZE}"
            )
        if mp.REFINE_BOX == "regressed" and self.box_transform is None:
            raise ValueError(
                "MODEL.MASK_PYRAMID.REFINE_BOX 'regressed' refines in the class head's regressed "
                "boxes: it needs REFINE_BOX_REGRESSION True"
            )
        self.sem_seg_head = (
            SemSegHead(channels, num_classes) if mp.SEM_SEG_LOSS_WEIGHT > 0 else None
        )
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.class_negatives = int(mp.CLASS_NEGATIVE_ROOTS)
        if self.class_negatives > 0 and (mp.CLASS_HEAD != "pooled" or not mp.CLASS_BACKGROUND):
            raise ValueError(
                "MODEL.MASK_PYRAMID.CLASS_NEGATIVE_ROOTS > 0 trains the pooled class head on "
                "pyramids of no instance: it needs CLASS_HEAD 'pooled' and CLASS_BACKGROUND True"
            )
        self.record_pruned = False  # the debugging view sets it to keep pruned masks

    @classmethod
    def from_config(cls, cfg):
        mp = cfg.MODEL.MASK_PYRAMID
        if mp.NUM_CLASSES <= 0:
            raise ValueError(
                "MODEL.MASK_PYRAMID.NUM_CLASSES must be set (or -1, resolved from the datasets "
                "by maskpyramid.config.resolve_num_classes before building)"
            )
        return {
            "backbone": build_backbone(cfg),
            "in_features": mp.IN_FEATURES,
            "readout_features": mp.READOUT_FEATURES,
            "num_classes": mp.NUM_CLASSES,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "mp": mp.clone(),
            "vis_period": cfg.VIS_PERIOD,
            "input_format": cfg.INPUT.FORMAT,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def _sizes(self, image_sizes) -> torch.Tensor:
        """(B, 2) float (height, width) of the images in the batch, on the model's device."""
        return torch.as_tensor(image_sizes, device=self.device, dtype=torch.float32).view(-1, 2)

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[Dict]):
        if not self.training:
            return self.inference_with_records(batched_inputs)[0]
        images, features, feats, n_on, cls_maps, iou_maps = self._features(batched_inputs)
        if "pyramid_targets" not in batched_inputs[0]:
            raise ValueError(
                "MaskPyramid training inputs lack 'pyramid_targets': train with "
                "maskpyramid.data.MaskPyramidDatasetMapper (Trainer.build_train_mapper)"
            )
        targets = self._batch_targets(batched_inputs, feats, images.image_sizes)
        records = self.grow(feats, cls_maps, iou_maps, images.image_sizes, n_on, targets)
        losses = self.losses(records, cls_maps, targets, feats, images.image_sizes)
        overlaps = self._overlaps(records[-1], targets, images.image_sizes)
        refine_boxes = None
        if self.class_head is not None:
            class_losses, refine_boxes = self._pooled_class_loss(
                records[-1], targets, features, images.image_sizes, overlaps
            )
            losses.update(class_losses)
        if self.refine_head is not None:
            losses["loss_refine"] = self._refine_loss(
                records[-1], targets, features, images.image_sizes, overlaps, refine_boxes
            )
        self._log_counts(records, len(batched_inputs))
        if self.vis_period > 0:
            storage = get_event_storage()
            if storage.iter % self.vis_period == 0:
                from ..vis.training import put_training_images  # drawing only when asked

                put_training_images(storage, batched_inputs, records, self.input_format)
        return losses

    def inference_with_records(self, batched_inputs: List[Dict]):
        """Inference, and what each level of growth did: (results, records), ``results`` as
        ``forward`` returns them in eval mode, ``records`` one :class:`LevelRecord` per level
        (of the whole batch). The pyramid growth viewer (``maskpyramid.vis``) draws these."""
        images, features, feats, n_on, cls_maps, iou_maps = self._features(batched_inputs)
        records = self.grow(feats, cls_maps, iou_maps, images.image_sizes, n_on)
        results = self.inference(records[-1], batched_inputs, images.image_sizes, features)
        return results, records

    def _features(self, batched_inputs):
        """Images, backbone features, the mask levels' features, the levels on, score maps."""
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        feats = [features[f] for f in self.mask_features]
        self._check_finite(feats, batched_inputs)
        n_on = self._levels_on() if self.training else self.test_levels
        score_levels = feats[: min(n_on, self.n_root)] if self.growth else feats[:1]
        cls_maps, iou_maps = self.score_head(score_levels)
        return images, features, feats, n_on, cls_maps, iou_maps

    def preprocess_image(self, batched_inputs):
        images = [
            (x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs
        ]
        return ImageList.from_tensors(images, self.backbone.size_divisibility)

    def _check_finite(self, feats, batched_inputs):
        # one sum per level and one host synchronisation: a NaN or Inf anywhere makes its
        # level's sum non-finite; only then (or when a finite sum overflows) cell by cell
        if bool(torch.isfinite(torch.stack([f.sum() for f in feats])).all()):
            return
        for name, f in zip(self.mask_features, feats):
            if not torch.isfinite(f).all():
                bad = (~torch.isfinite(f)).flatten(1).any(1).nonzero()[:, 0].tolist()
                ids = [
                    batched_inputs[i].get("image_id", batched_inputs[i].get("file_name"))
                    for i in bad
                ]
                raise FloatingPointError(
                    f"MaskPyramid: non-finite values in FPN feature '{name}' of image ids {ids} "
                    "(a NaN/Inf input image, or diverged weights: lower SOLVER.BASE_LR)"
                )

    def _levels_on(self) -> int:
        """Levels trained at this iteration (MODEL.MASK_PYRAMID.STAGE_ITERS)."""
        try:
            it = get_event_storage().iter
        except AssertionError:  # no EventStorage: not inside a trainer
            it = 1 << 62
        return max(1, sum(1 for s in self.stage_iters if it >= s))

    # ------------------------------------------------------------------ targets
    def _batch_targets(self, batched_inputs, feats, image_sizes):
        """Pad the mapper's per-image targets to the batch's feature maps; index instances
        across the batch."""
        dev = self.device
        offsets, classes, levels, batch, boxes, gt_masks = [], [], [], [], [], []
        start = 0
        for b, x in enumerate(batched_inputs):
            t, inst = x["pyramid_targets"], x["instances"]
            n = len(inst)
            offsets.append(start)
            # at the input's resolution, for REFINE_RESOLUTION (BitMasks or PolygonMasks)
            refine = self.refine_head is not None and inst.has("gt_masks")
            gt_masks.append(inst.gt_masks.to(dev) if refine else None)
            classes.append(inst.gt_classes.to(dev))
            boxes.append(inst.gt_boxes.tensor.to(dev))
            levels.append(t["levels"].to(dev))
            batch.append(torch.full((n,), b, dtype=torch.long, device=dev))
            start += n
        out = {
            "classes": torch.cat(classes),
            "levels": torch.cat(levels),
            "batch": torch.cat(batch),
            "boxes": torch.cat(boxes),
            "offsets": offsets,
            "gt_masks": gt_masks,
            "positives": [],
            "masks": [],
        }
        for lvl, (f, s) in enumerate(zip(feats, self.strides)):
            B, _, H, W = f.shape
            pos = torch.full((B, H, W), -2, dtype=torch.long, device=dev)
            masks = torch.zeros(start, H, W, device=dev)
            for b, x in enumerate(batched_inputs):
                t = x["pyramid_targets"]
                p = t["positives"][lvl].to(dev)
                h, w = p.shape
                pos[b, :h, :w] = torch.where(p >= 0, p + offsets[b], p)
                m = t["masks"][lvl]
                masks[offsets[b] : offsets[b] + m.shape[0], :h, :w] = m.to(dev).float()
            out["positives"].append(pos)
            out["masks"].append(masks)
        return out

    # ------------------------------------------------------------------ growth
    def _head(self, heads, level):
        return heads[0] if len(heads) == 1 else heads[level]

    def grow(self, feats, cls_maps, iou_maps, image_sizes, n_on, targets=None) -> List[LevelRecord]:
        """Run the growth loop over the first ``n_on`` levels; one record per level."""
        B = feats[0].shape[0]
        sizes = self._sizes(image_sizes)
        records: List[LevelRecord] = []
        pyr: Optional[G.Pyramids] = None
        levels = range(n_on) if self.growth else [0]
        for lvl in levels:
            mask_lvl = lvl if self.growth else len(feats) - 1
            f = feats[mask_lvl]
            stride = self.strides[mask_lvl]
            H, W = f.shape[-2:]
            valid = G.valid_cells(image_sizes, stride, H, W, f.device)
            uncovered = None
            if pyr is not None and not len(pyr):
                pyr = None  # every pyramid pruned: finer levels start afresh
            if pyr is not None:
                grow = self._grow_existing
                if lvl >= self.n_root and not self.training and self.mp.READOUT_GROW_MAX_SIZE:
                    grow = self._grow_or_upsample  # read-out levels at inference
                pyr = grow(
                    pyr, f, self._head(self.grow_heads, mask_lvl),
                    self.strides[records[-1].level], stride, (H, W), valid, sizes,
                )  # fmt: skip
            spawned = None
            if lvl < self.n_root:  # a root level: new roots spawn
                init_head = self._head(self.init_heads, min(mask_lvl, self.n_root - 1))
                base_init = init_head.image_features(f)
                if lvl > 0 and self.spawn_mode in ("uncovered", "both"):
                    if pyr is None:
                        uncovered = valid.clone()
                    else:
                        cov = G.coverage(pyr.logits.sigmoid(), pyr.batch, B)
                        uncovered = (cov < self.mp.LOW_THRESHOLD) & valid
                new, spawned = self._spawn(
                    lvl, mask_lvl, f, base_init, init_head, cls_maps, iou_maps, valid,
                    uncovered, pyr, sizes, targets,
                )  # fmt: skip
                pyr = G.Pyramids.cat([pyr, new]) if pyr is not None else new
            elif pyr is None:  # a read-out level after every pyramid was pruned
                pyr = dataclasses.replace(
                    records[-1].pyramids[:0],
                    logits=f.new_zeros(0, H, W),
                    territory=(
                        torch.zeros(0, H, W, dtype=torch.bool, device=f.device)
                        if self._keeps_territory()
                        else None
                    ),
                )
            if spawned is None:  # read-out levels only grow
                spawned = pyr.batch.new_zeros(0, 3)
            pyr, pruned, pruned_idx = self._prune(pyr, valid, B)
            records.append(
                LevelRecord(
                    name=self.mask_features[mask_lvl],
                    level=mask_lvl,
                    stride=stride,
                    pyramids=pyr,
                    spawned=spawned,
                    uncovered=uncovered,
                    num_pruned=pruned,
                    pruned_masks=pruned_idx[0] if pruned_idx else None,
                    pruned_batch=pruned_idx[1] if pruned_idx else None,
                )
            )
        return records

    def _keeps_territory(self) -> bool:
        """Whether the pyramids carry their territory: only the pseudo pyramids' loss in
        training (SPAWN_MODE "uncovered" / "both") reads it."""
        return self.training and self.spawn_mode != "peaks"

    def _windows(self, base, boxes, batch, stride):
        """(N, C, R, R) windows of ``base`` (B, C, H, W) over ``boxes`` of images ``batch``
        (None: one box per map): detectron2's ROIAlign, by ``G.pool_windows`` on the CPU with
        WINDOW_SAMPLING_RATIO 1 (the same samples, on every thread)."""
        if self.window_sampling == 1 and base.device.type == "cpu":
            return G.pool_windows(base, boxes, batch, self.window, 1.0 / stride)
        if batch is None:
            batch = torch.arange(len(boxes), device=boxes.device)
        rois = torch.cat([batch[:, None].to(boxes.dtype), boxes], 1)
        return ROIAlign(
            (self.window, self.window), 1.0 / stride, self.window_sampling, aligned=True
        )(base, rois)

    def _extras(self, boxes, pyr_roots, pyr_root_stride, cov, batch, stride):
        chans = [
            position_channels(
                boxes, self.window, pyr_roots, pyr_root_stride, self.mp.POSITION_RHO,
                point=self.extra >= 2,
            )
        ]  # fmt: skip
        if self.extra >= 3:
            chans.append(self._windows(cov[:, None], boxes, batch, stride))
        if self.offsets > 0:
            chans.append(
                offset_channels(boxes, self.window, pyr_roots, pyr_root_stride, self.offsets)
            )
        return torch.cat(chans, 1)

    def _select_class_channel(self, logits, classes):
        if logits.shape[1] == 1:
            return logits[:, 0]
        return logits[torch.arange(len(classes), device=logits.device), classes]

    def _grow_existing(self, pyr, f, head, prev_stride, stride, size, valid, sizes, up=None):
        """Upsample each surviving pyramid to this level and refine it inside its window
        (``up``: the pyramids' logits already upsampled, when the caller has them)."""
        if up is None:
            up = G.resample_to_grid(pyr.logits, prev_stride, size, stride)
        limits = G.image_boxes(sizes, pyr.batch)
        up_probs = up.sigmoid()
        probs = up_probs * valid[pyr.batch]
        boxes = self._support_or_root_boxes(
            probs, pyr.roots, stride, limits, self.mp.WINDOW_EPS, self.mp.WINDOW_MARGIN
        )
        pooled = self._windows(head.image_features(f), boxes, pyr.batch, stride)
        prev_win = self._windows(pyr.logits[:, None], boxes, None, prev_stride)
        cov = G.coverage(up_probs, pyr.batch, f.shape[0]) if self.extra >= 3 else None
        extras = torch.cat(
            [
                prev_win.sigmoid(),
                self._extras(boxes, pyr.roots, pyr.root_stride, cov, pyr.batch, stride),
            ],
            1,
        )
        skip = None
        if pyr.hidden is not None and self.mp.GROW_SKIP:
            skip = self._resample_hidden(pyr.hidden, pyr.windows, boxes)
        delta, hidden = head(pooled, extras, skip)
        win_logits = prev_win[:, 0] + self._select_class_channel(delta, pyr.classes)
        logits = G.soft_clamp(
            G.paste_windows(win_logits, boxes, size, stride, up), self.mp.LOGIT_CLAMP
        )
        territory = None
        if pyr.territory is not None:
            territory = G.resample_to_grid(pyr.territory.float(), prev_stride, size, stride) > 0.5
        return G.Pyramids(
            batch=pyr.batch, roots=pyr.roots, root_level=pyr.root_level,
            root_stride=pyr.root_stride,
            logits=logits, cls_logits=pyr.cls_logits, scores=pyr.scores, classes=pyr.classes,
            target=pyr.target, pseudo=pyr.pseudo, territory=territory,
            hidden=hidden if self.mp.GROW_SKIP else None, windows=boxes,
            iou_logits=pyr.iou_logits,
        )  # fmt: skip

    def _grow_or_upsample(self, pyr, f, head, prev_stride, stride, size, valid, sizes):
        """``_grow_existing`` for the pyramids whose mask box on the previous level has a side
        below READOUT_GROW_MAX_SIZE; the others are upsampled (and soft-clamped, as the growth
        does outside its windows), keeping their window and head features."""
        boxes, _ = self._mask_boxes(pyr, prev_stride, sizes)
        small = G.box_sides(boxes) < self.mp.READOUT_GROW_MAX_SIZE
        up = G.resample_to_grid(pyr.logits, prev_stride, size, stride)
        if bool(small.all()):
            return self._grow_existing(pyr, f, head, prev_stride, stride, size, valid, sizes, up)
        out = dataclasses.replace(pyr, logits=G.soft_clamp(up, self.mp.LOGIT_CLAMP))
        idx = small.nonzero().squeeze(1)
        if not len(idx):
            return out
        grown = self._grow_existing(
            pyr[idx], f, head, prev_stride, stride, size, valid, sizes, up[idx]
        )
        hidden = None
        if grown.hidden is not None:
            hidden = pyr.hidden.index_copy(0, idx, grown.hidden)
        return dataclasses.replace(
            out,
            logits=out.logits.index_copy(0, idx, grown.logits),
            windows=pyr.windows.index_copy(0, idx, grown.windows),
            hidden=hidden,
        )

    def _resample_hidden(self, hidden, old_boxes, new_boxes):
        """The coarser level's head features, moved from the old window into the new one
        (zero where the new window reaches beyond the old)."""
        xs, ys = window_cell_centres(new_boxes, self.window)
        moved, inside = G.sample_windows(hidden, old_boxes, xs, ys)
        return moved * inside[:, None]

    def _spawn(self, lvl, mask_lvl, f, base_init, head, cls_maps, iou_maps, valid, uncovered, pyr,
               sizes, targets):  # fmt: skip
        """New roots on level ``lvl`` (by SPAWN_MODE; positives always in training) and their
        masks on the mask level by the mask-init head."""
        mp = self.mp
        cls_map = cls_maps[lvl]
        Hr, Wr = cls_map.shape[-2:]
        root_stride = self.strides[lvl]
        score_map = cls_map.detach().sigmoid().amax(1)  # (B, Hr, Wr)
        if root_stride == self.strides[mask_lvl] and (Hr, Wr) == tuple(valid.shape[-2:]):
            root_valid = valid  # the root grid is the mask grid (growth on)
        else:
            root_valid = G.valid_cells(sizes, root_stride, Hr, Wr, f.device)
        positives = targets["positives"][lvl] if targets is not None else None
        start_grid = lvl == 0 and len(mp.START_GRID) == 2
        if start_grid:
            return self._spawn_grid(
                mask_lvl, f, base_init, head, cls_map, iou_maps[lvl], sizes, targets
            )
        if lvl == 0 and mp.FIRST_LEVEL_ROOTS == "all":
            cand = root_valid.clone()
        else:
            cand = torch.zeros_like(root_valid)
            if lvl == 0 or self.spawn_mode in ("peaks", "both"):
                peak = mp.PEAK_THRESHOLD if self.training else mp.PEAK_THRESHOLD_TEST
                cand |= G.local_peaks(score_map, peak) & root_valid
            if uncovered is not None:  # growth on: the root grid is the mask grid
                cand |= uncovered
        is_pos = torch.zeros_like(cand)
        if positives is not None:
            is_pos = positives >= 0
            if self.spawn_mode == "peaks":
                # non-positive peak roots carry no mask loss: training spawns the positives, and
                # the CLASS_NEGATIVE_ROOTS best-scoring others per image, for the class head only
                others = cand & ~is_pos
                cand = is_pos.clone()
                if self.class_negatives > 0:
                    ob, oi, oj = others.nonzero(as_tuple=True)
                    top = G.rank_within_group(ob, score_map[ob, oi, oj]) < self.class_negatives
                    cand[ob[top], oi[top], oj[top]] = True
            else:
                cand = cand | is_pos
        b, i, j = cand.nonzero(as_tuple=True)
        pos_flag = is_pos[b, i, j]
        target = (
            positives[b, i, j].clamp(min=-1) if positives is not None else torch.full_like(b, -1)
        )
        scores = score_map[b, i, j]
        # in training, non-positive roots of "uncovered" / "both" hold background
        pseudo = ~pos_flag & (positives is not None) & (self.spawn_mode != "peaks")
        # caps before any head runs: positives first, then score; pseudo pyramids apart
        priority = scores + 2.0 * pos_flag.float()
        caps = torch.where(pseudo, mp.MAX_PSEUDO, mp.MAX_PYRAMIDS)
        keep = (G.rank_within_group(b * 2 + pseudo.long(), priority) < caps).nonzero().squeeze(1)
        b, i, j, target, scores, pseudo = (
            b[keep],
            i[keep],
            j[keep],
            target[keep],
            scores[keep],
            pseudo[keep],
        )
        roots = torch.stack([(j.float() + 0.5) * root_stride, (i.float() + 0.5) * root_stride], 1)
        cls_logits = cls_map[b, :, i, j]
        iou_logits = iou_maps[lvl][b, i, j] if iou_maps[lvl] is not None else None
        # territory: the root cell dilated by one cell, on the mask level's grid
        territory = None
        if self._keeps_territory():
            Hm, Wm = f.shape[-2:]
            ys = (torch.arange(Hm, device=f.device) + 0.5) * self.strides[mask_lvl]
            xs = (torch.arange(Wm, device=f.device) + 0.5) * self.strides[mask_lvl]
            reach = 1.5 * root_stride
            territory = ((ys[None, :, None] - roots[:, 1, None, None]).abs() < reach) & (
                (xs[None, None, :] - roots[:, 0, None, None]).abs() < reach
            )
        new = self._init_masks(
            mask_lvl, lvl, f, base_init, head, b, roots,
            torch.full_like(scores, float(root_stride)),
            cls_logits, scores, target, pseudo, territory, iou_logits, sizes, pyr, targets,
        )  # fmt: skip
        spawned = torch.stack([b, i, j], 1)
        return new, spawned

    def _spawn_grid(self, mask_lvl, f, base_init, head, cls_map, iou_map, sizes, targets):
        """First-level roots on a fixed START_GRID over each image."""
        positives = targets["positives"][0] if targets is not None else None
        gh, gw = (int(v) for v in self.mp.START_GRID)
        B = f.shape[0]
        dev = f.device
        u = (torch.arange(gw, device=dev, dtype=torch.float32) + 0.5) / gw
        v = (torch.arange(gh, device=dev, dtype=torch.float32) + 0.5) / gh
        b = torch.arange(B, device=dev).repeat_interleave(gh * gw)
        gy, gx = torch.meshgrid(v, u, indexing="ij")
        roots = torch.stack(
            [gx.reshape(-1)[None] * sizes[:, 1:2], gy.reshape(-1)[None] * sizes[:, :1]], -1
        )
        roots = roots.reshape(-1, 2)
        stride0 = self.strides[0]
        i = (roots[:, 1] / stride0).long().clamp(max=cls_map.shape[-2] - 1)
        j = (roots[:, 0] / stride0).long().clamp(max=cls_map.shape[-1] - 1)
        cls_logits = cls_map[b, :, i, j]
        scores = cls_logits.detach().sigmoid().amax(1)
        target = (
            positives[b, i, j].clamp(min=-1) if positives is not None else torch.full_like(b, -1)
        )
        root_stride = ((sizes[b, 0] / gh + sizes[b, 1] / gw) / 2).float()
        iou_logits = iou_map[b, i, j] if iou_map is not None else None
        pseudo = torch.zeros_like(b, dtype=torch.bool)
        territory = None
        if self._keeps_territory():
            territory = torch.zeros(len(b), *f.shape[-2:], dtype=torch.bool, device=dev)
        new = self._init_masks(
            mask_lvl, 0, f, base_init, head, b, roots, root_stride, cls_logits, scores, target,
            pseudo, territory, iou_logits, sizes, None, targets,
        )  # fmt: skip
        return new, torch.stack([b, i, j], 1)

    def _init_masks(self, mask_lvl, lvl, f, base_init, head, b, roots, root_stride, cls_logits,
                    scores, target, pseudo, territory, iou_logits, sizes, pyr,
                    targets):  # fmt: skip
        mp = self.mp
        stride = self.strides[mask_lvl]
        H, W = f.shape[-2:]
        limits = G.image_boxes(sizes, b)
        if lvl == 0:
            boxes = limits  # the first level's roots see the whole image
        else:
            side = torch.full_like(roots[:, 0], float(mp.INIT_WINDOW * self.strides[lvl]))
            boxes = G.centred_boxes(roots, side, limits)
        cov = None
        if self.extra >= 3:
            if pyr is not None and len(pyr):
                cov = G.coverage(pyr.logits.sigmoid(), pyr.batch, f.shape[0])
            else:
                cov = f.new_zeros(f.shape[0], H, W)
        pooled = self._windows(base_init, boxes, b, stride)
        extras = self._extras(boxes, roots, root_stride, cov, b, stride)
        logits_win, hidden = head(pooled, extras)
        classes = cls_logits.argmax(1) if len(b) else b
        if targets is not None and len(targets["classes"]):  # positives: their instance's class
            gt_cls = targets["classes"][target.clamp(min=0)]
            classes = torch.where(target >= 0, gt_cls, classes)
        win = self._select_class_channel(logits_win, classes)
        logits = G.paste_windows(win, boxes, (H, W), stride, -abs(mp.LOGIT_CLAMP) or -20.0)
        logits = G.soft_clamp(logits, mp.LOGIT_CLAMP)
        return G.Pyramids(
            batch=b, roots=roots, root_level=torch.full_like(b, lvl),
            root_stride=root_stride.float(),
            logits=logits, cls_logits=cls_logits, scores=scores, classes=classes, target=target,
            pseudo=pseudo, territory=territory, hidden=hidden if mp.GROW_SKIP else None,
            windows=boxes,
            iou_logits=iou_logits,
        )  # fmt: skip

    def _prune(self, pyr, valid, B):
        """Drop pyramids that are in no pixel's top TOPK_KEEP above LOW_THRESHOLD; apply caps.
        In training, positives are never dropped (teacher forcing)."""
        mp = self.mp
        n_before = torch.bincount(pyr.batch, minlength=B)
        probs = pyr.logits.sigmoid() * valid[pyr.batch]
        keep = G.topk_survivors(probs.detach(), pyr.batch, B, mp.LOW_THRESHOLD, mp.TOPK_KEEP)
        is_pos = pyr.target >= 0
        keep |= is_pos
        priority = pyr.scores + 2.0 * is_pos.float() - 4.0 * (~keep).float()
        group = pyr.batch * 2 + pyr.pseudo.long()
        caps = torch.where(pyr.pseudo, mp.MAX_PSEUDO, mp.MAX_PYRAMIDS)
        keep &= G.rank_within_group(group, priority) < caps
        pruned = n_before - torch.bincount(pyr.batch[keep], minlength=B)
        extra = None
        if self.record_pruned:
            extra = (pyr.logits[~keep].detach(), pyr.batch[~keep])
        return pyr[keep], pruned, extra

    # ------------------------------------------------------------------ losses
    def losses(self, records, cls_maps, targets, feats, image_sizes) -> Dict[str, torch.Tensor]:
        mp = self.mp
        n_score = len(cls_maps)
        out = {
            "loss_cls": mp.CLASS_LOSS_WEIGHT
            * dense_class_loss(
                cls_maps,
                targets["positives"][:n_score],
                targets["classes"],
                mp.FOCAL_ALPHA,
                mp.FOCAL_GAMMA,
            )
        }
        zero = cls_maps[0].sum() * 0
        territory_terms = []
        inst_levels = targets["levels"]
        for rec in records:
            lvl, pyr = rec.level, rec.pyramids
            H, W = pyr.logits.shape[-2:]
            valid = G.valid_cells(image_sizes, rec.stride, H, W, self.device)
            gt = targets["masks"][lvl]  # (M, H, W)
            union = (
                G.coverage(gt, targets["batch"], len(image_sizes))
                if len(gt)
                else gt.new_zeros(len(image_sizes), H, W)
            )
            pos = pyr.target >= 0
            loss_pos = zero
            if pos.any():
                logits, tgt = pyr.logits[pos], gt[pyr.target[pos]]
                v = valid[pyr.batch[pos]].float()
                weights = v
                if mp.DROWN_WEIGHT > 0:
                    weights = v * (
                        1 + mp.DROWN_WEIGHT * self._drowned(pyr, pos, gt, targets, inst_levels)
                    )
                per = per_pyramid_mask_loss(logits, tgt, weights, mp.MASK_LOSS)
                if mp.MASK_LOSS == "bce_dice":
                    per = per + dice_loss(logits, tgt, v)
                loss_pos = per.mean()
                if mp.TERRITORY_WEIGHT > 0:
                    others = (union[pyr.batch[pos]] - tgt).clamp(min=0)
                    territory_terms.append(territory_penalty(logits, tgt, others, v))
            out[f"loss_mask_{rec.name}"] = self.level_weights[lvl] * loss_pos
            pseudo = pyr.pseudo & (pyr.target < 0)
            if mp.SPAWN_MODE != "peaks":
                loss_pseudo = zero
                if pseudo.any():
                    ub = union[pyr.batch[pseudo]]
                    # roots inside an instance get no mask target (only the class negative)
                    root_i = (pyr.roots[pseudo, 1] / rec.stride).long().clamp(max=H - 1)
                    root_j = (pyr.roots[pseudo, 0] / rec.stride).long().clamp(max=W - 1)
                    has_target = ub[torch.arange(len(ub), device=ub.device), root_i, root_j] < 0.5
                    if has_target.any():
                        ub = ub[has_target]
                        logits = pyr.logits[pseudo][has_target]
                        terr = pyr.territory[pseudo][has_target].float()
                        v = valid[pyr.batch[pseudo][has_target]].float()
                        weights = v * torch.maximum(terr, (ub > 0).float())
                        loss_pseudo = per_pyramid_mask_loss(
                            logits, 1 - ub, weights, mp.MASK_LOSS
                        ).mean()
                        if mp.TERRITORY_WEIGHT > 0:
                            territory_terms.append(
                                territory_penalty(logits, terr * (1 - ub), ub, v)
                            )
                out[f"loss_pseudo_{rec.name}"] = (
                    mp.PSEUDO_WEIGHT * self.level_weights[lvl] * loss_pseudo
                )
        if mp.TERRITORY_WEIGHT > 0:
            terms = torch.cat(territory_terms) if territory_terms else zero[None]
            out["loss_territory"] = mp.TERRITORY_WEIGHT * (terms.mean() if len(terms) else zero)
        if mp.SCORE_MODE == "maskiou" and not self.pooled_maskiou:
            out["loss_maskiou"] = mp.MASKIOU_LOSS_WEIGHT * self._maskiou_loss(
                records[-1], targets, image_sizes
            )
        if self.sem_seg_head is not None:
            out["loss_sem_seg"] = mp.SEM_SEG_LOSS_WEIGHT * self._sem_seg_loss(
                feats, targets, records[-1], image_sizes
            )
        return out

    def _drowned(self, pyr, pos, gt, targets, inst_levels):
        """(P, H, W): pixels of instances rooted on finer levels than the pyramid's, not its own."""
        B = targets["positives"][0].shape[0]  # images in the batch
        n_levels = len(self.in_features)
        finer = gt.new_zeros(B, n_levels, *gt.shape[1:])
        for r in range(n_levels):  # levels only
            sel = inst_levels > r
            if sel.any():
                finer[:, r] = G.coverage(gt[sel], targets["batch"][sel], B)
        own = gt[pyr.target[pos]]
        return (finer[pyr.batch[pos], pyr.root_level[pos]] - own).clamp(min=0)

    def _maskiou_loss(self, rec, targets, image_sizes):
        pyr = rec.pyramids
        pos = pyr.target >= 0
        if not pos.any() or pyr.iou_logits is None:
            return self.score_head.maskiou.weight.sum() * 0
        H, W = pyr.logits.shape[-2:]
        valid = G.valid_cells(image_sizes, rec.stride, H, W, self.device)
        iou = mask_iou(
            pyr.logits[pos].detach(),
            targets["masks"][rec.level][pyr.target[pos]],
            valid[pyr.batch[pos]],
        )
        return torch.nn.functional.mse_loss(pyr.iou_logits[pos].sigmoid(), iou)

    def _sem_seg_loss(self, feats, targets, rec, image_sizes):
        f = feats[rec.level]
        logits = self.sem_seg_head(f)
        B, C, H, W = logits.shape
        gt = targets["masks"][rec.level]
        target = logits.new_zeros(B * C, H, W)
        if len(gt):
            target = G.coverage(gt, targets["batch"] * C + targets["classes"], B * C)
        valid = G.valid_cells(image_sizes, rec.stride, H, W, self.device)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, target.view(B, C, H, W), reduction="none"
        )
        return (loss * valid[:, None]).sum() / (valid.sum() * C).clamp(min=1)

    # ------------------------------------------------------------------ pooled classes
    def _pooled_class_logits(self, features, probs, batch, boxes, stride):
        """(K, C) class logits of masks ``probs`` (K, H, W) on a level of ``stride``, whose boxes
        (K, 4) are in input pixels (CLASS_HEAD "pooled"), (K,) mask-IoU logits (None unless
        SCORE_MODE "maskiou") and (K, 4) box deltas from ``boxes`` (None unless
        REFINE_BOX_REGRESSION; with BOX_REG_HEAD "own", from features pooled on ``boxes`` grown
        by BOX_REG_CONTEXT)."""
        r = self.mp.CLASS_POOL_RESOLUTION
        idx = torch.arange(len(probs), device=probs.device, dtype=boxes.dtype)
        pool = ROIAlign((r, r), 1.0 / stride, 0, aligned=True)
        pooled_masks = pool(probs[:, None], torch.cat([idx[:, None], boxes], 1))
        maps = [features[f] for f in self.class_features]
        logits, iou_logits, deltas = self.class_head(maps, boxes, batch, pooled_masks)
        if self.box_head is not None:  # BOX_REG_HEAD "own": on the box grown for context
            grow = (boxes[:, 2:] - boxes[:, :2]) * self.mp.BOX_REG_CONTEXT
            context = torch.cat([boxes[:, :2] - grow, boxes[:, 2:] + grow], 1)
            context_masks = pool(probs[:, None], torch.cat([idx[:, None], context], 1))
            deltas = self.box_head(maps, context, batch, context_masks)
        return logits, iou_logits, deltas

    def _mask_boxes(self, pyr, stride, sizes):
        """Boxes of the pyramids' masks (probability > 0.5) in input pixels, and the
        probabilities."""
        probs = pyr.logits.detach().sigmoid()
        limits = G.image_boxes(sizes, pyr.batch)
        return self._support_or_root_boxes(probs, pyr.roots, stride, limits, 0.5, 0), probs

    def _support_or_root_boxes(self, probs, roots, stride, limits, eps, margin):
        """Boxes where each (N, H, W) probability map exceeds ``eps``, plus ``margin`` cells; a
        map that exceeds it nowhere gets the INIT_WINDOW box around its root."""
        boxes, nonempty = G.support_boxes(probs, stride, eps, margin, limits)
        fallback = G.centred_boxes(
            roots, torch.full_like(roots[:, 0], self.mp.INIT_WINDOW * stride), limits
        )
        return torch.where(nonempty[:, None], boxes, fallback)

    def _pooled_class_loss(self, rec, targets, features, image_sizes, overlaps):
        """Cross-entropy of the pooled class head (``loss_cls_pooled``) on every ground-truth
        instance (its box and mask) and on every positive pyramid (the box and probabilities of
        its own mask; with CLASS_BACKGROUND, labelled background when that mask's IoU with its
        instance is below CLASS_FG_IOU); with CLASS_NEGATIVE_ROOTS, also on the other pyramids
        alive at the last level (``_negative_labels``).

        With SCORE_MODE "maskiou", also ``loss_maskiou``: binary cross-entropy of the predicted
        mask IoU against the IoU of each pyramid's final mask (logit > 0) with its instance (for
        the other pyramids: with the instance it overlaps best, 0 for none), on the pyramids only
        (a ground-truth mask's IoU is 1 by construction). Its minimum is the targets' entropy,
        not 0.

        With REFINE_BOX_REGRESSION, also ``loss_box_reg`` (``_box_reg_loss``).

        Returns the losses, and the regressed boxes (N, 4) of the pyramids of ``rec`` (detached;
        NaN for those the head did not see), or None without REFINE_BOX_REGRESSION."""
        pyr = rec.pyramids
        pos = pyr.target >= 0
        sizes = self._sizes(image_sizes)
        gt_masks = targets["masks"][rec.level]
        pos_labels = targets["classes"][pyr.target[pos]]
        iou_targets = []
        if (self.mp.CLASS_BACKGROUND or self.pooled_maskiou) and pos.any():
            H, W = pyr.logits.shape[-2:]
            valid = G.valid_cells(image_sizes, rec.stride, H, W, self.device)
            iou = mask_iou(
                pyr.logits[pos].detach(), gt_masks[pyr.target[pos]], valid[pyr.batch[pos]]
            )
            iou_targets.append(iou)
        if self.mp.CLASS_BACKGROUND and pos.any():
            pos_labels = torch.where(
                iou >= self.mp.CLASS_FG_IOU,
                pos_labels,
                torch.full_like(pos_labels, self.num_classes),
            )
        probs, boxes, batch, labels = (
            [gt_masks],
            [targets["boxes"]],
            [targets["batch"]],
            [targets["classes"]],
        )
        # the instance each row's box regresses to: the ground truth's own (deltas 0), the
        # positives' instance, the others' when they overlap it as the class head's foreground
        instances = [torch.arange(len(targets["classes"]), device=pyr.batch.device)]
        sel, sel_labels, sel_instances = [pos], [pos_labels], [pyr.target[pos]]
        neg = ~pos if self.class_negatives > 0 else pos.new_zeros(pos.shape)
        if neg.any():
            neg_labels, neg_iou = self._negative_labels(overlaps, neg, targets)
            sel.append(neg)
            sel_labels.append(neg_labels)
            iou_targets.append(neg_iou)
            best, owner = overlaps[0][neg], overlaps[1][neg]
            sel_instances.append(torch.where(best >= self.mp.CLASS_FG_IOU, owner, -1))
        rows = []  # the pyramids of each row after the ground truth
        for s, s_labels, s_instances in zip(sel, sel_labels, sel_instances):
            if s.any():
                s_boxes, s_probs = self._mask_boxes(pyr[s], rec.stride, sizes)
                probs.append(s_probs)
                boxes.append(s_boxes)
                batch.append(pyr.batch[s])
                labels.append(s_labels)
                instances.append(s_instances)
                rows.append(s.nonzero()[:, 0])
        labels = torch.cat(labels)
        heads = [self.class_head] + ([self.box_head] if self.box_head is not None else [])
        zero = sum(p.sum() for h in heads for p in h.parameters()) * 0
        out = {"loss_cls_pooled": zero}
        if self.pooled_maskiou:
            out["loss_maskiou"] = zero
        refine_boxes = None
        if self.box_transform is not None:
            out["loss_box_reg"] = zero
            refine_boxes = torch.full((len(pyr), 4), float("nan"), device=pyr.batch.device)
        if not len(labels):
            return out, refine_boxes
        boxes = torch.cat(boxes)
        logits, iou_logits, deltas = self._pooled_class_logits(
            features, torch.cat(probs), torch.cat(batch), boxes, rec.stride
        )
        n_gt = len(targets["classes"])  # the ground-truth masks come first
        if self.box_transform is not None:
            out["loss_box_reg"] = self._box_reg_loss(deltas, boxes, torch.cat(instances), targets)
            if rows:
                rows = torch.cat(rows)
                refine_boxes[rows] = self._regressed_boxes(
                    deltas[n_gt:].detach(), boxes[n_gt:], pyr.batch[rows], sizes
                )
        out["loss_cls_pooled"] = self.mp.POOLED_CLASS_LOSS_WEIGHT * F.cross_entropy(logits, labels)
        if self.pooled_maskiou and len(labels) > n_gt:
            out["loss_maskiou"] = self.mp.MASKIOU_LOSS_WEIGHT * F.binary_cross_entropy_with_logits(
                iou_logits[n_gt:], torch.cat(iou_targets)
            )
        return out, refine_boxes

    def _box_reg_loss(self, deltas, boxes, instances, targets) -> torch.Tensor:
        """``loss_box_reg``: L1 loss of the class head's box deltas (K, 4) from ``boxes`` (K, 4)
        to the boxes of their ``instances`` (K,; -1: none, no loss), summed and divided by the K
        rows (Fast R-CNN's normalisation); only rows whose box overlaps their instance's with
        IoU >= BOX_REG_MIN_IOU."""
        fg = (instances >= 0).nonzero()[:, 0]
        gt_boxes = targets["boxes"][instances[fg]]
        close = matched_pairwise_iou(Boxes(boxes[fg]), Boxes(gt_boxes)) >= self.mp.BOX_REG_MIN_IOU
        fg, gt_boxes = fg[close], gt_boxes[close]
        if not len(fg):
            return deltas.sum() * 0
        gt_deltas = self.box_transform.get_deltas(boxes[fg], gt_boxes)
        loss = F.l1_loss(deltas[fg], gt_deltas, reduction="sum") / len(deltas)
        return self.mp.BOX_REG_LOSS_WEIGHT * loss

    def _regressed_boxes(self, deltas, boxes, batch, sizes) -> torch.Tensor:
        """The class head's boxes (K, 4): ``deltas`` applied to ``boxes``, clipped to the
        images."""
        out = self.box_transform.apply_deltas(deltas, boxes)
        return G.clip_boxes(out, G.image_boxes(sizes, batch))

    def _negative_labels(self, overlaps, neg, targets):
        """Class labels of the pyramids ``neg`` (rooted on no instance, CLASS_NEGATIVE_ROOTS):
        the class of the instance of their image whose mask their final mask overlaps best
        (``overlaps``), when that IoU reaches CLASS_FG_IOU, otherwise background (as Fast R-CNN
        labels its proposals); and that best IoU (0 without instances), the target of the
        pooled mask-IoU output."""
        best, owner = overlaps[0][neg], overlaps[1][neg]
        labels = torch.full_like(owner, self.num_classes)
        if len(targets["classes"]):
            fg = best >= self.mp.CLASS_FG_IOU
            labels = torch.where(fg, targets["classes"][owner], labels)
        return labels, best.clamp(min=0)

    def _overlaps(self, rec, targets, image_sizes):
        """For the pyramids of ``rec`` rooted on no instance, once per training step when the
        class head's negatives (CLASS_NEGATIVE_ROOTS) or REFINE_OVERLAPPING need it: (best IoU
        of the final mask with an instance of its image, that instance), (N,) each; -1 and 0
        for the positives, for every pyramid without instances in its image, and when unused."""
        pyr = rec.pyramids
        best = torch.full((len(pyr),), -1.0, device=pyr.batch.device)
        owner = torch.zeros_like(pyr.batch)
        needed = (self.class_head is not None and self.class_negatives > 0) or (
            self.refine_head is not None and self.mp.REFINE_OVERLAPPING
        )
        others = pyr.target < 0
        if needed and others.any() and len(targets["classes"]):
            best[others], owner[others] = self._best_instances(
                pyr[others], rec, targets["masks"][rec.level], targets, image_sizes
            )
        return best, owner

    def _best_instances(self, pyr, rec, gt_masks, targets, image_sizes):
        """For each pyramid (N,): the best IoU of its final mask (logit > 0) with an instance
        of its image (-1 for none) and that instance (its index in ``targets``); needs at least
        one instance in the batch."""
        H, W = pyr.logits.shape[-2:]
        valid = G.valid_cells(image_sizes, rec.stride, H, W, self.device)
        iou = mask_iou_matrix((pyr.logits.detach() > 0) & valid[pyr.batch], gt_masks >= 0.5)
        iou = torch.where(pyr.batch[:, None] == targets["batch"][None], iou, -1.0)
        return iou.max(1)

    # ------------------------------------------------------------------ refinement
    def _refine(self, pyr, stride, sizes, features, regressed=None, classes=None, passes=1):
        """(K, R, R) refined logits of the pyramids' masks at object resolution
        (REFINE_RESOLUTION) on their grown mask boxes (K, 4), input pixels; with ``regressed``
        (K, 4) boxes (REFINE_BOX_REGRESSION), on the union of the two, or with REFINE_BOX
        "regressed" on the regressed box alone (a NaN row: the grown mask box alone).
        ``classes`` (K,): the class masks taken with REFINE_CLASS_SPECIFIC. With ``passes`` > 1
        (REFINE_PASSES, at inference), every pass after the first refines again in the tight box
        of the previous pass's mask (with REFINE_PASS_MIN_SIZE, only where that box is as large)."""
        mp = self.mp
        boxes, probs = self._mask_boxes(pyr, stride, sizes)
        limits = G.image_boxes(sizes, pyr.batch)
        grow = (boxes[:, 2:] - boxes[:, :2]) * mp.REFINE_BOX_MARGIN + stride / 2
        low, high = boxes[:, :2] - grow, boxes[:, 2:] + grow
        if regressed is not None:
            known = torch.isfinite(regressed).all(1, keepdim=True)
            if mp.REFINE_BOX == "regressed":
                low = torch.where(known, regressed[:, :2], low)
                high = torch.where(known, regressed[:, 2:], high)
            else:
                low = torch.where(known, torch.minimum(low, regressed[:, :2]), low)
                high = torch.where(known, torch.maximum(high, regressed[:, 2:]), high)
        boxes = G.clip_boxes(torch.cat([low, high], 1), limits)
        logits = self._refine_in(pyr, stride, features, boxes, classes, probs)
        for _ in range(int(passes) - 1):
            tight = G.clip_boxes(G.tight_boxes(logits.sigmoid() > mp.MASK_THRESHOLD, boxes), limits)
            # only the masks whose tight box is large enough are refined again; the others keep
            # the previous pass's logits and box
            large = G.box_sides(tight) >= mp.REFINE_PASS_MIN_SIZE
            if bool(large.all()):  # every mask (always with REFINE_PASS_MIN_SIZE 0): no gather
                boxes = tight
                logits = self._refine_in(pyr, stride, features, boxes, classes, probs)
                continue
            again = large.nonzero().squeeze(1)
            if not len(again):
                break
            logits = logits.index_copy(
                0, again,
                self._refine_in(
                    pyr[again], stride, features, tight[again],
                    classes[again] if classes is not None else None, probs[again],
                ),
            )  # fmt: skip
            boxes = boxes.index_copy(0, again, tight[again])
        return logits, boxes

    def _refine_in(self, pyr, stride, features, boxes, classes=None, probs=None):
        """(K, R, R) refined logits of the pyramids' masks in the given boxes (K, 4), input
        pixels (``_refine`` gives their grown mask boxes); ``probs``: the masks' probabilities
        when already computed."""
        r = int(self.mp.REFINE_RESOLUTION)
        logits = pyr.logits.detach()
        probs = logits.sigmoid() if probs is None else probs
        idx = torch.arange(len(pyr), device=boxes.device, dtype=boxes.dtype)
        rois = torch.cat([idx[:, None], boxes], 1)
        pooled_probs = ROIAlign((r // 2, r // 2), 1.0 / stride, 0, aligned=True)(
            probs[:, None], rois
        )
        prior = None  # the pyramid's own logits in the box: only a residual head adds to them
        if self.refine_head.residual:
            prior = ROIAlign((r, r), 1.0 / stride, 0, aligned=True)(logits[:, None], rois)[:, 0]
        maps = [features[f] for f in self.refine_features]
        return self.refine_head(maps, boxes, pyr.batch, pooled_probs, prior, classes)

    def _refined_masks(
        self, pyr, stride, sizes, features, out_size, size, thresh, regressed, classes, index
    ):
        """(K, h, w) bool output masks of the pyramids ``index`` of ``pyr`` (one image),
        refined and pasted into the image (the ``readout`` of ``pyramids_to_instances``);
        ``regressed``: the pyramids' regressed boxes, or None; ``classes``: their most probable
        classes (REFINE_CLASS_SPECIFIC), or None."""
        regressed = regressed[index] if regressed is not None else None
        classes = classes[index] if classes is not None else None
        logits, boxes = self._refine(
            pyr[index], stride, sizes, features, regressed, classes, self.mp.REFINE_PASSES
        )
        return paste_in_image(logits, boxes, out_size, size, thresh)

    def _refine_loss(
        self, rec, targets, features, image_sizes, overlaps, regressed=None
    ) -> torch.Tensor:
        """``loss_refine``: binary cross-entropy of the refined logits against the ground-truth
        mask cropped to the same box (as Mask R-CNN's mask loss), on positive pyramids (with
        REFINE_OVERLAPPING, also on the others whose final mask overlaps an instance with IoU >=
        CLASS_FG_IOU, against that instance); at most REFINE_MAX_PER_IMAGE per image, taken
        round-robin over the image's instances (each instance's highest-scoring pyramid
        first), so every instance is seen. ``regressed``: the pyramids' regressed boxes
        (REFINE_BOX_REGRESSION), or None."""
        pyr = rec.pyramids
        instance = pyr.target
        if self.mp.REFINE_OVERLAPPING:  # overlaps: -1 for the positives
            best, owner = overlaps
            instance = torch.where(best >= self.mp.CLASS_FG_IOU, owner, instance)
        pos = (instance >= 0).nonzero()[:, 0]
        zero = sum(p.sum() for p in self.refine_head.parameters()) * 0
        cap = int(self.mp.REFINE_MAX_PER_IMAGE)
        if cap > 0 and len(pos):
            turn = G.rank_within_group(instance[pos], pyr.scores[pos])
            pos = pos[G.rank_within_group(pyr.batch[pos], -turn.float()) < cap]
        sizes = self._sizes(image_sizes)
        specific = self.mp.REFINE_CLASS_SPECIFIC
        gt_boxes, gt_target = self._jittered_gt_boxes(
            targets, sizes, rec.stride, int(self.mp.REFINE_GT_BOXES), self.mp.REFINE_GT_JITTER
        )
        if not len(pos) and not len(gt_target):
            return zero
        target, batch = instance[pos], pyr.batch[pos]
        r = int(self.mp.REFINE_RESOLUTION)
        if len(pos):
            logits, boxes = self._refine(
                pyr[pos],
                rec.stride,
                sizes,
                features,
                regressed[pos] if regressed is not None else None,
                targets["classes"][target] if specific else None,
            )
        else:
            logits, boxes = gt_boxes.new_zeros(0, r, r), gt_boxes.new_zeros(0, 4)
        if len(gt_target):  # no pyramid: its mask channel and prior are zero
            gt_batch = targets["batch"][gt_target]
            gt_logits = self.refine_head(
                [features[f] for f in self.refine_features],
                gt_boxes,
                gt_batch,
                gt_boxes.new_zeros(len(gt_boxes), 1, r // 2, r // 2),
                gt_boxes.new_zeros(len(gt_boxes), r, r),
                targets["classes"][gt_target] if specific else None,
            )
            logits, boxes = torch.cat([logits, gt_logits]), torch.cat([boxes, gt_boxes])
            target, batch = torch.cat([target, gt_target]), torch.cat([batch, gt_batch])
        gt = torch.zeros_like(logits)
        for b, masks in enumerate(targets["gt_masks"]):  # images, as detectron2's mask loss
            sel = (batch == b).nonzero()[:, 0]
            if not len(sel):
                continue
            if masks is None:
                raise ValueError(
                    "MODEL.MASK_PYRAMID.REFINE_RESOLUTION > 0 needs the instances' gt_masks at "
                    "the input's resolution (the dataset mapper's instance masks)"
                )
            local = (target[sel] - targets["offsets"][b]).cpu()
            gt[sel] = masks[local].crop_and_resize(boxes[sel], r).to(gt.dtype)
        return self.mp.REFINE_LOSS_WEIGHT * F.binary_cross_entropy_with_logits(logits, gt)

    def _jittered_gt_boxes(self, targets, sizes, stride, copies, jitter):
        """``copies`` boxes per ground-truth instance (REFINE_GT_BOXES), as Mask R-CNN's mask
        head learns on proposals near each instance: its box with the centre moved by up to
        ``jitter`` (REFINE_GT_JITTER) of the side and each side scaled by up to
        exp(+-``jitter``), then grown by the margin ``_refine`` gives a mask box (not with
        REFINE_BOX "regressed", whose boxes are not grown), clipped to the image. Returns (K, 4)
        boxes and (K,) instances (indices into the batch's instances)."""
        gt = targets["boxes"]
        instance = torch.arange(len(gt), device=gt.device).repeat_interleave(max(copies, 0))
        if not len(instance):
            return gt.new_zeros(0, 4), instance
        boxes = G.jitter_boxes(gt[instance], float(jitter))
        if self.mp.REFINE_BOX != "regressed":  # the regressed boxes are not grown
            grow = (boxes[:, 2:] - boxes[:, :2]) * self.mp.REFINE_BOX_MARGIN + stride / 2
            boxes = torch.cat([boxes[:, :2] - grow, boxes[:, 2:] + grow], 1)
        limits = G.image_boxes(sizes, targets["batch"][instance])
        return G.clip_boxes(boxes, limits), instance

    def _log_counts(self, records, num_images):
        try:
            storage = get_event_storage()
        except AssertionError:
            return
        for rec in records:
            storage.put_scalar(
                f"pyramids/{rec.name}", len(rec.pyramids) / num_images, smoothing_hint=True
            )

    # ------------------------------------------------------------------ inference
    def inference(self, rec: LevelRecord, batched_inputs, image_sizes, features=None):
        mp = self.mp
        pyr = rec.pyramids
        class_scores, regressed = self._class_scores(pyr, rec, image_sizes, features)  # (N, C)
        k = max(1, min(int(mp.CLASSES_PER_PYRAMID), self.num_classes))
        scores, classes = class_scores.topk(k, dim=1)  # (N, k) hypotheses, best first
        results = []
        sizes = self._sizes(image_sizes)
        logit_thresh = torch.logit(torch.tensor(float(mp.MASK_THRESHOLD))).item()
        for b, (x, size) in enumerate(zip(batched_inputs, image_sizes)):
            sel = pyr.batch == b
            out_size = (x.get("height", size[0]), x.get("width", size[1]))
            readout = None
            if self.refine_head is not None:
                readout = functools.partial(
                    self._refined_masks, pyr[sel], rec.stride, sizes, features, out_size,
                    tuple(size), logit_thresh, regressed[sel] if regressed is not None else None,
                    classes[sel, 0] if mp.REFINE_CLASS_SPECIFIC else None,
                )  # fmt: skip
            inst = pyramids_to_instances(
                pyr.logits[sel], scores[sel], classes[sel],
                rec.stride, tuple(size), out_size, mp.SCORE_THRESH_TEST, mp.MASK_THRESHOLD,
                mp.MIN_KEPT_FRACTION, mp.NMS, mp.NMS_THRESH, mp.MATRIX_NMS_SIGMA,
                mp.DETECTIONS_PER_IMAGE, mp.PAINTED_OUTPUT, readout, mp.REFINE_SCORE_THRESH,
                mp.NMS_MASKS,
            )  # fmt: skip
            results.append({"instances": inst})
        return results

    def _class_scores(self, pyr, rec, image_sizes, features):
        """(N, C) score of each final pyramid for each class: the root head's class
        probabilities; with the pooled class head, its class probabilities (of the foreground
        classes, with CLASS_BACKGROUND), times the root objectness (the root's largest class
        probability) with CLASS_SCORE_ROOT; times the predicted mask IoU with SCORE_MODE
        "maskiou". And (REFINE_BOX_REGRESSION) the pooled class head's regressed boxes (N, 4),
        NaN where it did not run (scores that cannot reach SCORE_THRESH_TEST), else None."""
        mp = self.mp
        scores = pyr.cls_logits.sigmoid()
        regressed = None
        quality = (
            pyr.iou_logits.sigmoid()
            if mp.SCORE_MODE == "maskiou" and pyr.iou_logits is not None
            else scores.new_ones(len(pyr))
        )
        if self.class_head is not None:
            if mp.CLASS_SCORE_ROOT:
                # objectness x quality bounds the score: the class head need not see the rest
                quality = quality * scores.amax(1)
                run = quality > mp.SCORE_THRESH_TEST
            else:
                run = torch.ones_like(quality, dtype=torch.bool)
            scores = scores.new_zeros(len(pyr), self.num_classes)
            if self.box_transform is not None:
                regressed = torch.full((len(pyr), 4), float("nan"), device=scores.device)
            if run.any():
                sub = pyr[run]
                sizes = self._sizes(image_sizes)
                boxes, probs = self._mask_boxes(sub, rec.stride, sizes)
                logits, iou_logits, deltas = self._pooled_class_logits(
                    features, probs, sub.batch, boxes, rec.stride
                )
                scores[run] = logits.softmax(1)[:, : self.num_classes]
                if deltas is not None:
                    regressed[run] = self._regressed_boxes(deltas, boxes, sub.batch, sizes)
                if iou_logits is not None:
                    quality = quality.clone()
                    quality[run] = quality[run] * iou_logits.sigmoid()
        return scores * quality[:, None], regressed
