"""Run a test's worker in WORLD gloo processes on the CPU, and say why when one of them dies.

Each process writes its stderr to a file of its own and dumps every thread's Python stack on a
fatal signal (faulthandler), so a process killed by the gloo transport (SIGABRT) names the
collective it was in; the failure raised here carries each process's last lines. The processes
meet in a FileStore (no TCP port to race for), and the successful ones pass a barrier before
tearing the group down, so none closes its connections while another still reads from them.
"""
import datetime
import faulthandler
import os
import sys
import tempfile
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

TIMEOUT = datetime.timedelta(seconds=60)  # a process left waiting in a collective fails at this
_TAIL_LINES = 40


def _stderr_path(out_dir: str, run: str, rank: int) -> str:
    return os.path.join(out_dir, f"{run}.rank{rank}.stderr")


def _entry(rank: int, worker: Callable, world: int, out_dir: str, run: str, store: str, args: tuple) -> None:
    log = open(_stderr_path(out_dir, run, rank), "w", buffering=1)
    os.dup2(log.fileno(), sys.stderr.fileno())
    faulthandler.enable(file=log, all_threads=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        worker(rank, out_dir, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(worker: Callable[..., None], out_dir: str, *args: Any, world: int = 2) -> None:
    """worker(rank, out_dir, *args) in `world` processes; raises with each process's stderr tail."""
    run_name = getattr(worker, "__name__", "worker").strip("_")
    store = os.path.join(tempfile.mkdtemp(prefix=f"{run_name}.", dir=out_dir), "store")
    try:
        mp.spawn(_entry, args=(worker, world, out_dir, run_name, store, args), nprocs=world, join=True)
    except ProcessException as error:
        tails = []
        for rank in range(world):
            path = _stderr_path(out_dir, run_name, rank)
            lines = open(path).read().splitlines()[-_TAIL_LINES:] if os.path.exists(path) else ["(no stderr file)"]
            tails.append(f"--- process {rank}, last lines of {path} ---\n" + "\n".join(lines))
        raise AssertionError(f"{run_name} failed: {error}\n" + "\n".join(tails)) from error
