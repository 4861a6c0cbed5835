"""Figures of the project, one module per kind:

- :mod:`.pyramids`: the pyramid growth viewer (per-level panels of one image's growth, drawn
  from ``MaskPyramid.inference_with_records``; ``tools/visualize_pyramids.py``);
- :mod:`.training`: the training-time images of ``VIS_PERIOD`` (``EventStorage.put_image``);
- :mod:`.plots`: training curves, AP bar charts and the side-by-side comparison's figure
  (matplotlib's Agg canvas: files only, no display, no pyplot state).

This ``__init__`` imports none of its modules, so that ``import maskpyramid.vis`` stays cheap
(no matplotlib); import a module by name, e.g.
``from maskpyramid.vis.plots import plot_training_curves``.
"""
