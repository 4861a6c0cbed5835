"""Config keys of the project: ``add_maskpyramid_config`` and the number-of-classes check."""

import torch
from detectron2.config import CfgNode
from detectron2.config import CfgNode as CN
from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = ["add_maskpyramid_config", "NUM_CLASSES_KEYS", "resolve_num_classes"]

# Where each meta-architecture reads its number of classes; projects add theirs.
NUM_CLASSES_KEYS = {
    "GeneralizedRCNN": ("MODEL.ROI_HEADS.NUM_CLASSES",),
    "RetinaNet": ("MODEL.RETINANET.NUM_CLASSES",),
    "MaskPyramid": ("MODEL.MASK_PYRAMID.NUM_CLASSES",),
}


def add_maskpyramid_config(cfg: CfgNode) -> None:
    """Add the project's config keys and defaults to ``cfg`` (in place)."""
    # -1: take the number of classes from the training set's thing_classes (resolve_num_classes)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = -1
    cfg.MODEL.RETINANET.NUM_CLASSES = -1
    # the same configs run on a CPU machine and on a GPU machine; set it to force either
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    _add_mask_pyramid_keys(cfg)


def _add_mask_pyramid_keys(cfg: CfgNode) -> None:
    """``MODEL.MASK_PYRAMID``: the growing mask-pyramid model (../shared/design/mask_pyramid.md)."""
    mp = cfg.MODEL.MASK_PYRAMID = CN()
    # -1: from the training set's thing_classes (resolve_num_classes)
    mp.NUM_CLASSES = -1
    # FPN levels the pyramids grow through, coarse to fine; masks are read out on the last one
    mp.IN_FEATURES = ["p6", "p5", "p4", "p3"]
    # False: the single-level reference (SOLO-like): every root of the first level predicts its
    # whole mask directly on the last level with the mask-init head; no growth, no spawning
    mp.GROWTH = True
    # finer FPN levels after IN_FEATURES where the pyramids only grow (no roots spawn there, no
    # scores): the resolution the final masks are read out at, e.g. ["p2"] (stride 4); [] = the
    # last level of IN_FEATURES. STAGE_ITERS and LEVEL_LOSS_WEIGHTS count these levels too.
    mp.READOUT_FEATURES = []
    # False: inference stops at the last level of IN_FEATURES and reads the masks out there (the
    # class head and the refinement pool them at its stride); READOUT_FEATURES then only train
    mp.READOUT_TEST = True
    # at inference, only the pyramids whose mask box (probability > 0.5 on the previous level)
    # has a side (square root of its area, input pixels) below this grow into READOUT_FEATURES
    # by the mask-grow head; the larger ones are upsampled (0 = every pyramid grows). Training
    # grows them all
    mp.READOUT_GROW_MAX_SIZE = 0
    # iteration from which each level of IN_FEATURES is trained (staged training, coarse levels
    # first); before it, growth stops at the previous level. [] = every level from the start
    mp.STAGE_ITERS = []

    # --- targets (prepared by the dataset mapper, once per image) ---
    # per level of IN_FEATURES: [low, high) of an instance's size sqrt(w * h) of its mask's box,
    # pixels; ranges may overlap (an instance then has roots on several levels)
    mp.SIZE_RANGES = [[256, 100000], [128, 256], [64, 128], [0, 64]]
    # which root pixels are positive for an instance of their level: "center" (within
    # CENTER_RADIUS cells of the mask's centre of mass and inside its box), "mask" (inside the
    # mask), "atss" (adaptive: ATSS_TOPK cells nearest the centre on every level, threshold at
    # mean + std of their quality; ignores SIZE_RANGES)
    mp.ASSIGN_MODE = "center"
    mp.CENTER_RADIUS = 1.5
    # "center" and "atss": a candidate root's cell centre must also lie on the instance's own
    # mask, not on another object or background inside its box (the cell nearest the centre of
    # mass that does is always a candidate). Off, 32% of the p6 positives of shapes sat on another
    # object, and their masks had IoU 0.22 with the instance (0.51 for those on it)
    mp.CENTER_IN_MASK = True
    # with CENTER_IN_MASK: "on the instance" counts its holes too (the inside of its outer
    # contours) where no other instance is visible: a ring's roots may sit in its hole, at its
    # centre, rather than on its band beside it. On shapes it did not help the rings (segm AP
    # 12.9 / 8.3 with it, 10.6 / 8.3 without, seeds 42 / 3 of the _long config)
    mp.CENTER_FILL_HOLES = False
    mp.ATSS_TOPK = 9
    # "atss" only: side of the virtual square a cell is compared with, in cells of its level
    mp.ATSS_SCALE = 4.0
    # keep only the positive root nearest the centre per instance and level (duplicate control
    # at the source; the alternative is MIN_KEPT_FRACTION at inference)
    mp.ONE_POSITIVE_PER_LEVEL = False

    # --- spawning, pruning, caps ---
    # "peaks" (3x3 local maxima of the root-score map above PEAK_THRESHOLD), "uncovered" (the
    # log's: pixels no pyramid covers with probability >= LOW_THRESHOLD; non-positive pyramids
    # become pseudo pyramids holding background), or "both"
    mp.SPAWN_MODE = "peaks"
    # in training (where "peaks" spawns the positives and CLASS_NEGATIVE_ROOTS of the peaks) ...
    mp.PEAK_THRESHOLD = 0.05
    # ... and at inference, where every peak above it becomes a root. A pyramid's score is at
    # most its root's (except with CLASS_HEAD "pooled" and CLASS_SCORE_ROOT False): a higher
    # value grows fewer pyramids, faster, and loses outputs scored below it
    mp.PEAK_THRESHOLD_TEST = 0.05
    # roots of the first level: "all" (every pixel, capped by score) or "peaks"
    mp.FIRST_LEVEL_ROOTS = "all"
    # a fixed root grid [rows, cols] for the first level (e.g. [7, 10]); [] = its pixel grid
    mp.START_GRID = []
    # uncovered pixels and pruning: a pyramid survives only where its probability >= this ...
    mp.LOW_THRESHOLD = 0.2
    # ... and it is among the TOPK_KEEP most probable pyramids of some such pixel
    mp.TOPK_KEEP = 3
    # hard caps per image and level: pyramids (positives first in training, then by score) ...
    mp.MAX_PYRAMIDS = 100
    # ... and pseudo pyramids, counted separately so they never push positives out
    mp.MAX_PSEUDO = 32

    # --- heads ---
    # channels of the per-pyramid mask heads (their windows are pooled from the FPN level)
    mp.HEAD_CHANNELS = 64
    # 3x3 conv + GN + ReLU layers each mask head runs on its whole level once per image, before
    # the windows are pooled (per image, not per pyramid)
    mp.FEATURE_CONVS = 2
    # their width: 0 = the FPN's channels (256); e.g. 64 runs them about 6x cheaper (the first
    # narrows the FPN features). At 256 they were about a fifth of shapes' inference time (p2's
    # alone 11%)
    mp.TOWER_CHANNELS = 0
    # 3x3 convs of the mask-init head after the position map joins (>= 2 with "concat")
    mp.INIT_CONVS = 2
    # 3x3 convs of the mask-grow head
    mp.GROW_CONVS = 2
    # side of the square window each pyramid's heads work in, cells (pooled with ROIAlign)
    mp.WINDOW_SIZE = 16
    # ROIAlign's sampling ratio for the windows: points per bin side; 0 = adaptive (ceil of the
    # bin's size in cells: large windows on fine levels sample densely)
    mp.WINDOW_SAMPLING_RATIO = 0
    # side of the window a new root's mask-init head sees on levels after the first, in cells
    # of that level (the first level's roots see the whole image)
    mp.INIT_WINDOW = 8
    # a growing pyramid's window: where its upsampled probability > WINDOW_EPS, plus margin cells
    mp.WINDOW_EPS = 0.05
    mp.WINDOW_MARGIN = 1
    # how the position map enters: "concat" (own conv weights, summed with the features' first
    # conv) or "multiply" (features times the Gaussian)
    mp.POSITION_MODE = "concat"
    # radius at half maximum of the Gaussian position map, in cells of the root's level
    mp.POSITION_RHO = 1.0
    # extra input channels: 1 = position map, 2 = + root point, 3 = + the coarser level's masks
    # (coverage of the image by the other pyramids)
    mp.EXTRA_CHANNELS = 1
    # > 0: two more input channels, the offset to the root (x - root) / (this * root's stride):
    # relative coordinates that, unlike the Gaussian, do not fade away from the root; 0 = off
    mp.POSITION_OFFSETS = 0.0
    # "level" (one mask-init and one mask-grow head per level) or "shared" (one across levels)
    mp.HEAD_SHARING = "level"
    # per-class mask predictors (the pyramid's class picks the channel)
    mp.CLASS_SPECIFIC_MASKS = False
    # U-Net style skip: the grow head also gets the pyramid's hidden features of the coarser level
    mp.GROW_SKIP = False
    # 3x3 convs of the dense root-score (class) tower, shared across levels
    mp.SCORE_CONVS = 2
    # pyramid score: "root" (class probability at the root) or "maskiou" (times a predicted mask
    # IoU, mask-scoring style: predicted by the pooled class head from the pyramid's final mask
    # with CLASS_HEAD "pooled", else by the dense score head at the root)
    mp.SCORE_MODE = "root"
    # where a pyramid's class comes from: "root" (the dense head's class at its root) or "pooled"
    # (a classifier over the FPN features and the pyramid's own mask, RoIAligned on the box of its
    # final mask: what shapes' classes need, whose cues are at the outline, not at the centre).
    # With "pooled", score = root objectness (max class probability at the root) x class
    # probability; the dense head still ranks roots and spawns them.
    mp.CLASS_HEAD = "root"
    # "pooled": FPN levels it pools from (detectron2's ROIPooler level rule, canonical 224 px on
    # the 4th stride-16 level), pooled resolution, 3x3 convs with GroupNorm, fully connected
    # layers
    mp.CLASS_POOL_FEATURES = ["p2", "p3", "p4", "p5"]
    mp.CLASS_POOL_RESOLUTION = 7
    # ROIAlign's points per bin side (as ROI_BOX_HEAD.POOLER_SAMPLING_RATIO); 0 = adaptive, the
    # ceiling of the bin's size in cells: 9 to 16 points per bin for most boxes
    mp.CLASS_POOL_SAMPLING_RATIO = 0
    mp.CLASS_NUM_CONV = 2
    mp.CLASS_CONV_DIM = 128
    mp.CLASS_NUM_FC = 1
    mp.CLASS_FC_DIM = 512
    # "pooled": one more output, background (Fast R-CNN's convention), trained on the positive
    # pyramids whose final mask has an IoU below CLASS_FG_IOU with their instance: the class
    # probability then also says how good the mask is, and ranks the outputs by it
    mp.CLASS_BACKGROUND = False
    mp.CLASS_FG_IOU = 0.5
    # "pooled" with CLASS_BACKGROUND: > 0 also trains the class head on pyramids rooted on no
    # instance, as inference grows them: in "peaks" training, up to this many non-positive roots
    # per image and root level (the best-scoring candidates) are spawned besides the positives
    # (no mask loss, pruned as at inference); every non-positive pyramid alive at the last level
    # (pseudo pyramids too, in "uncovered" / "both") is labelled with the class of the instance
    # its mask overlaps best when that IoU >= CLASS_FG_IOU, else background. 0 = off (the class
    # head then sees the ground truth and the positives only)
    mp.CLASS_NEGATIVE_ROOTS = 0
    # "pooled": score = root objectness x class probability (True), or the class probability
    # alone (False: with CLASS_BACKGROUND it also says "no instance here")
    mp.CLASS_SCORE_ROOT = True
    # mask logits are soft-clamped to +-LOGIT_CLAMP (tanh), keeping sigmoids trainable; 0 = off
    mp.LOGIT_CLAMP = 12.0

    # --- losses ---
    # "bce_dice" (BCE on logits plus dice on positives: the masks of a pyramid cover a small part
    # of the image, and BCE alone first drives them all to 0), "bce", "l1" or "l2" (on
    # probabilities)
    mp.MASK_LOSS = "bce_dice"
    # per level of IN_FEATURES; [] = all 1
    mp.LEVEL_LOSS_WEIGHTS = []
    # weight of the pseudo pyramids' mean mask loss ("uncovered" mode); 0 allowed
    mp.PSEUDO_WEIGHT = 0.1
    # extra BCE weight on pixels of instances assigned to finer levels ("punish the drowner")
    mp.DROWN_WEIGHT = 0.0
    # weight of the territory penalty: mean probability on others' ground above own ground
    mp.TERRITORY_WEIGHT = 0.0
    mp.FOCAL_ALPHA = 0.25
    mp.FOCAL_GAMMA = 2.0
    mp.CLASS_LOSS_WEIGHT = 1.0
    mp.MASKIOU_LOSS_WEIGHT = 1.0
    # "pooled" class head: cross-entropy on the ground-truth instances and the positive pyramids
    # (labelled background below CLASS_FG_IOU, with CLASS_BACKGROUND)
    mp.POOLED_CLASS_LOSS_WEIGHT = 1.0
    # auxiliary per-class semantic segmentation on the last level (YOLACT); 0 = off
    mp.SEM_SEG_LOSS_WEIGHT = 0.0

    # --- refinement at object resolution (the last growth step, to the input's resolution) ---
    # each final pyramid's mask is refined inside its own mask box (probability > 0.5, no box
    # regression) by a Mask R-CNN-style head (detectron2's MaskRCNNConvUpsampleHead: 3x3 convs
    # on ROIAlign-pooled FPN features plus the pyramid's mask, then a 2x deconv), which adds to
    # the pyramid's logits resampled into the box (REFINE_RESIDUAL): REFINE_RESOLUTION x
    # REFINE_RESOLUTION logits (pooled at half of it) pasted into the image. A mask on the
    # stride-4 grid has 4x4 cells for a 16-pixel object. 0 = off: masks are read out on the last
    # level's grid
    mp.REFINE_RESOLUTION = 0
    # FPN levels to pool from (each box's level by its size, as Mask R-CNN's ROIPooler)
    mp.REFINE_FEATURES = ["p2", "p3", "p4", "p5"]
    mp.REFINE_CONVS = 4
    # ROIAlign's points per bin side for the features (as ROI_MASK_HEAD.POOLER_SAMPLING_RATIO);
    # 0 = adaptive
    mp.REFINE_SAMPLING_RATIO = 0
    mp.REFINE_CHANNELS = 64
    # the mask box grows by this fraction of its side, plus half a cell of the last level, on
    # each side (room to grow beyond the coarse mask)
    mp.REFINE_BOX_MARGIN = 0.1
    # the pooled class head also regresses each pyramid's instance box from its mask box (Fast
    # R-CNN's class-agnostic deltas, Box2BoxTransform weights 10, 10, 5, 5, L1 loss), and the
    # refinement works on the union of the grown mask box and the regressed box, in training as
    # at inference: room for what the coarse mask missed (on shapes, the masks of rings covered
    # half of the ring). Needs CLASS_HEAD "pooled" and REFINE_RESOLUTION > 0
    mp.REFINE_BOX_REGRESSION = False
    # weight of that L1 loss (``loss_box_reg``), summed over the regressed rows and divided by all
    # the class head's rows, as Fast R-CNN's
    mp.BOX_REG_LOSS_WEIGHT = 1.0
    # which layers regress the boxes: "detached", a fully connected layer of its own on the
    # pooled class head's convolution maps, which its loss does not train (sharing the class
    # head's fully connected layers cost 6.6 segm AP on shapes_val); "own", a head of its own
    # (CLASS_NUM_CONV GroupNorm convs of CLASS_CONV_DIM, one fully connected layer) on features
    # pooled from the mask box grown by BOX_REG_CONTEXT, trained through the FPN as Fast R-CNN's
    # box head: it sees where the object goes on beyond its coarse mask. On shapes (_long,
    # REFINE_BOX "regressed", seed 42): box IoU with the instances 0.684 -> 0.696 (small objects
    # 0.649 -> 0.688), segm AP 33.6 -> 34.2; seeds 3 and 1: 18.5 (32.5 with "detached"; the
    # whole model trained slower, final loss 5.86 against 5.34) and 37.7: unstable, not kept
    mp.BOX_REG_HEAD = "detached"
    # with BOX_REG_HEAD "own": the box it pools grows by this fraction of the mask box's side on
    # each side (its deltas are still from the mask box)
    mp.BOX_REG_CONTEXT = 0.25
    # the refinement's box with REFINE_BOX_REGRESSION: "union" of the grown mask box and the
    # regressed box; "regressed": the regressed box alone, not grown (as Mask R-CNN's mask head
    # works in its box head's boxes: the box tells the head the object's extent), the grown mask
    # box where the class head regressed none. REFINE_GT_BOXES' boxes are then not grown either.
    # On shapes (_long, with REFINE_GT_BOXES 2, seeds 42 and 3): segm AP 33.6 and 32.5, rings
    # 16.2 and 13.5, against 33.85, 29.96, 10.6 and 8.4 with "union" (the shapes config's choice)
    mp.REFINE_BOX = "union"
    # a row regresses only when its mask box overlaps its instance's box with at least this IoU
    # (Fast R-CNN regresses its foreground proposals, IoU >= 0.5): an untrained mask's box of a
    # cell or of the whole image says nothing of where the instance is
    mp.BOX_REG_MIN_IOU = 0.3
    # True: the head's output is a correction added to the pyramid's own logits resampled into
    # the box (the refined mask starts as the pyramid's); False: the head's output is the mask
    # (Mask R-CNN's mask head, which also sees the pyramid's mask as an input channel), free to
    # depart from the pyramid's logits wherever the features say so
    mp.REFINE_RESIDUAL = True
    # binary cross-entropy against the ground-truth mask cropped to the box, on positive
    # pyramids (as Mask R-CNN's mask loss, on its foreground proposals)
    mp.REFINE_LOSS_WEIGHT = 1.0
    # also on the pyramids rooted on no instance (CLASS_NEGATIVE_ROOTS, or pseudo pyramids)
    # whose final mask overlaps an instance with IoU >= CLASS_FG_IOU, against that instance (as
    # Mask R-CNN's foreground proposals): inference refines such pyramids too
    mp.REFINE_OVERLAPPING = False
    # at most this many pyramids per image enter the loss, taken round-robin over the image's
    # instances (each instance's highest-scoring pyramid first), bounding its cost
    mp.REFINE_MAX_PER_IMAGE = 32
    # the refinement also learns on this many boxes per ground-truth instance, its box jittered
    # (centre moved by up to REFINE_GT_JITTER of its side, sides scaled by up to
    # exp(+-REFINE_GT_JITTER)) and grown as a mask box (REFINE_BOX_MARGIN), with a zero prior
    # mask: as Mask R-CNN's mask head learns on proposals near each instance from the first
    # iteration, whatever the pyramids' masks are; 0 = off (only the pyramids' own boxes). On
    # shapes (_long, seed 42, 2 boxes): segm AP 33.1, rings 11.5, against 33.85 and 10.6 without
    mp.REFINE_GT_BOXES = 0
    mp.REFINE_GT_JITTER = 0.1
    # the refinement predicts one mask per class (as Mask R-CNN's mask head, ROI_MASK_HEAD.
    # CLS_AGNOSTIC_MASK False) and uses its pyramid's class: in training the class of the
    # instance it learns, at inference the pyramid's most probable class (one mask per pyramid,
    # shared by its CLASSES_PER_PYRAMID outputs). False: one class-agnostic mask. On shapes
    # (_long, seed 42) the ring mask did not learn: segm AP 27.0, rings 0.9 (33.85, 10.6 without)
    mp.REFINE_CLASS_SPECIFIC = False
    # inference: only the output pyramids whose best score reaches this are refined; the others
    # (low-scored outputs, most of them false positives) are read out on the last level's grid
    mp.REFINE_SCORE_THRESH = 0.0
    # inference: each further pass refines the pyramid again in the tight box of the previous
    # pass's mask (its cells above MASK_THRESHOLD; an empty mask keeps its box); 1 = one pass
    # (training always refines once). On shapes (_long, REFINE_BOX "regressed", the same
    # weights): 2 passes, segm AP 33.6 -> 33.9 and 32.5 -> 33.0 (seeds 42 and 3), 34.2 -> 34.9
    # with BOX_REG_HEAD "own" (3 passes: 34.9); medium and large objects gain, small ones not
    mp.REFINE_PASSES = 1
    # ... and only for the masks whose tight box after the previous pass is at least this large
    # (square root of its area, input pixels; 0 = every mask): on shapes the further passes help
    # medium and large objects, not small ones (APs -0.5 to 0)
    mp.REFINE_PASS_MIN_SIZE = 0

    # --- inference ---
    mp.SCORE_THRESH_TEST = 0.05
    # what demo.py and the pyramid growth viewer draw: the outputs scoring at least this. Scores
    # are products of probabilities (root objectness x class probability x predicted mask IoU),
    # so a good mask often scores 0.05-0.3 where a Mask R-CNN box scores above 0.5. The COCO
    # evaluation does not use it (it ranks the outputs by score)
    mp.VIS_SCORE_THRESH = 0.05
    mp.DETECTIONS_PER_IMAGE = 100
    # each kept pyramid is output once for each of its K most probable classes (with that
    # class's score, above SCORE_THRESH_TEST), as Mask R-CNN outputs a box once per class;
    # 1 = its best class only. On shapes (5 classes): segm AP 5.2 / 6.5 / 6.5 with K = 1 / 3 / 5
    mp.CLASSES_PER_PYRAMID = 3
    # output masks: probability above this (the refined masks, and the level's grid for NMS and
    # the outputs not refined); 0.5 as detectron2's Mask R-CNN pastes its masks. On shapes a
    # lower one gains for both models (0.4: MaskPyramid +0.25 to +0.7 segm AP on three trained
    # models, Mask R-CNN +1.2; one MaskPyramid model at 0.3 / 0.4 / 0.45 / 0.5 / 0.6: 28.9 /
    # 30.5 / 30.4 / 30.0 / 27.5), so comparisons keep both at 0.5
    mp.MASK_THRESHOLD = 0.5
    # after priority painting (by score), drop pyramids keeping less of their own mask; 0 = off
    mp.MIN_KEPT_FRACTION = 0.5
    # output the painted (disjoint) masks instead of each pyramid's own mask
    mp.PAINTED_OUTPUT = False
    # "none", "mask" (greedy mask-IoU NMS), "fast" (YOLACT's Fast NMS on masks) or "matrix"
    # (SOLOv2's Matrix NMS, Gaussian decay)
    mp.NMS = "none"
    mp.NMS_THRESH = 0.5
    mp.MATRIX_NMS_SIGMA = 2.0
    # the masks NMS (and MIN_KEPT_FRACTION's painting) judge overlaps on: "grid" (each pyramid's
    # mask on the last level's grid, before the refinement) or "output" (the output masks, read
    # out first: refined at REFINE_RESOLUTION, the final ones that the evaluation sees)
    mp.NMS_MASKS = "grid"


def _thing_classes(dataset_name: str):
    meta = MetadataCatalog.get(dataset_name)
    if "thing_classes" not in meta.as_dict():
        DatasetCatalog.get(dataset_name)  # loading a COCO json sets them
    classes = meta.get("thing_classes", None)
    if not classes:
        raise ValueError(f"dataset '{dataset_name}' has no thing_classes in its metadata")
    return list(classes)


def resolve_num_classes(cfg: CfgNode) -> int:
    """Make the number of classes agree with the datasets, before anything is built.

    The config's value is taken from the training set when it is -1; an explicit value that
    differs from the training set's ``thing_classes``, or test sets whose classes differ from the
    training set's, are errors (otherwise detectron2 trains, then evaluates against the wrong
    category ids).

    Returns:
        the number of classes; ``cfg`` (unfrozen) is updated in place.
    """
    keys = NUM_CLASSES_KEYS.get(cfg.MODEL.META_ARCHITECTURE, ())
    names = list(cfg.DATASETS.TRAIN) or list(cfg.DATASETS.TEST)
    if not names:
        return -1
    reference = _thing_classes(names[0])
    for name in list(cfg.DATASETS.TRAIN[1:]) + list(cfg.DATASETS.TEST):
        classes = _thing_classes(name)
        if classes != reference:
            raise ValueError(
                f"dataset '{name}' has thing_classes {classes}, but '{names[0]}' has {reference}: "
                "DATASETS.TRAIN and DATASETS.TEST must share their classes"
            )
    for key in keys:
        node, leaf = cfg, key.split(".")
        for part in leaf[:-1]:
            node = node[part]
        value = node[leaf[-1]]
        if value == -1:
            node[leaf[-1]] = len(reference)
        elif value != len(reference):
            raise ValueError(
                f"{key} is {value}, but the training set '{names[0]}' has {len(reference)} "
                f"thing_classes {reference}. Set {key} to {len(reference)}, or to -1 to follow "
                "the dataset."
            )
    return len(reference)
