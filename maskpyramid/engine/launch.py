"""Multi-process launch that also works on CPU.

detectron2 v0.6's ``launch`` asserts CUDA and hard-codes NCCL. On CUDA this defers to it
unchanged; without CUDA it spawns the same processes with the gloo backend (what upstream
detectron2 does on CPU since 2023), sets detectron2's local process group, and gives each process
its share of the CPU threads.
"""

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as detectron2_launch
from detectron2.engine.launch import _find_free_port
from detectron2.utils import comm

__all__ = ["launch", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = timedelta(minutes=30)
logger = logging.getLogger(__name__)


def launch(
    main_func,
    num_processes_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = None,
    args=(),
    timeout: timedelta = DEFAULT_TIMEOUT,
    backend: str = None,
):
    """Run ``main_func(*args)`` in ``num_processes_per_machine`` processes on every machine.

    Args:
        main_func: the function each process runs.
        num_processes_per_machine: processes on this machine (``--num-gpus``; GPUs on CUDA).
        num_machines: machines in the job.
        machine_rank: rank of this machine.
        dist_url: ``tcp://host:port`` of machine 0, or "auto" for a free local port.
        args: arguments of ``main_func``.
        timeout: timeout of collective operations.
        backend: "nccl" or "gloo"; default: nccl when CUDA is available, else gloo.
    """
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend.lower() == "nccl":
        return detectron2_launch(
            main_func,
            num_processes_per_machine,
            num_machines,
            machine_rank,
            dist_url,
            args,
            timeout,
        )
    world_size = num_machines * num_processes_per_machine
    if world_size == 1:
        return main_func(*args)
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("--dist-url auto only works on one machine; give tcp://HOST:PORT")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    mp.spawn(
        _cpu_worker,
        nprocs=num_processes_per_machine,
        args=(main_func, world_size, num_processes_per_machine, machine_rank, dist_url, args,
              timeout),  # fmt: skip
        daemon=False,
    )


def _cpu_worker(
    local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url, args, timeout
):
    global_rank = machine_rank * num_per_machine + local_rank
    try:
        dist.init_process_group(
            backend="gloo",
            init_method=dist_url,
            world_size=world_size,
            rank=global_rank,
            timeout=timeout,
        )
    except Exception:
        logger.error(f"Process group URL: {dist_url}")
        raise
    # detectron2's comm.get_local_rank/size read this group
    num_machines = world_size // num_per_machine
    for i in range(num_machines):
        group = dist.new_group(list(range(i * num_per_machine, (i + 1) * num_per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    # processes share the cores instead of each starting one thread per core
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_per_machine))
    comm.synchronize()
    main_func(*args)
