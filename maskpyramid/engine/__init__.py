from .defaults import argument_parser, build_cfg, register_datasets_from_args, setup
from .launch import launch
from .predictor import CheckpointError, Predictor, load_checkpoint
from .trainer import AtomicCheckpointer, Trainer, create_ddp_model

__all__ = [
    "AtomicCheckpointer",
    "CheckpointError",
    "Predictor",
    "Trainer",
    "argument_parser",
    "build_cfg",
    "create_ddp_model",
    "launch",
    "load_checkpoint",
    "register_datasets_from_args",
    "setup",
]
