"""Figures of the project, one module per kind: e.g. :mod:`.plots`, training curves and AP bar
charts of ``train_net.py`` runs (matplotlib's Agg canvas: files only, no display, no pyplot state).

This ``__init__`` imports none of its modules, so that ``import maskpyramid.vis`` stays cheap
(no matplotlib); import a module by name, e.g.
``from maskpyramid.vis.plots import plot_training_curves``.
"""
