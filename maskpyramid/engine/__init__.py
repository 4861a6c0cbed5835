from .defaults import argument_parser, register_datasets_from_args, setup
from .launch import launch
from .trainer import AtomicCheckpointer, Trainer, create_ddp_model
