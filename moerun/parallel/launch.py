"""Starting N ranks over torch.distributed (gloo on CPUs, NCCL on CUDA), the way torchrun users
expect: under torchrun (RANK / WORLD_SIZE / MASTER_ADDR in the environment) a process joins the
job it was started in; otherwise `run_ranks` spawns ranks 1..N-1 on this machine and runs rank 0
itself. A rank that dies makes the others fail loudly (gloo reports the closed connection; the
collectives time out after TIMEOUT at worst), never hang forever.
"""

import os
import socket
import sys
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moerun.errors import MoerunError

TIMEOUT = timedelta(days=7)  # an idle server's ranks wait in a collective all along
RENDEZVOUS = timedelta(seconds=60)  # every rank must have joined by then


def threads_per_rank(local_ranks: int) -> int:
    """CPU threads for one of `local_ranks` ranks on this machine: the cores shared out, so N
    ranks do not oversubscribe them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // local_ranks)


def backend(device: str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def join_torchrun(device: str) -> tuple[int, int]:
    """(rank, world size) of the torchrun job this process belongs to, the group initialized."""
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    torch.set_num_threads(threads_per_rank(local))
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend(device), rank=rank, world_size=size, timeout=TIMEOUT)
    return rank, size


def leave_torchrun() -> None:
    """The end of a rank's part in a torchrun job: wait until every rank is done (no
    collective in flight), then close the group before the interpreter's shutdown, whose
    arbitrary destructor order can abort a live gloo group."""
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, size: int, port: int, device: str) -> None:
    torch.set_num_threads(threads_per_rank(size))
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(rank)
    # the rendezvous gives up after RENDEZVOUS (a rank that died before joining); the group's
    # collectives after TIMEOUT (an idle server's ranks wait in one for as long as it idles)
    store = dist.TCPStore("127.0.0.1", port, size, is_master=rank == 0, timeout=RENDEZVOUS)
    dist.init_process_group(backend(device), store=store, rank=rank, world_size=size,
                            timeout=TIMEOUT)  # fmt: skip


def _rank_main(rank: int, size: int, port: int, device: str, fn: Callable, args: tuple) -> None:
    _join(rank, size, port, device)
    try:
        fn(rank, size, *args)
        dist.barrier()  # no collective of this job is still in flight when a rank leaves
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's shutdown: a group's C++ threads torn down there in
    # arbitrary order can abort ("terminate called without an active exception", seen once in
    # CI), turning a rank whose work succeeded into a failed one.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _watch(workers: list, done: threading.Event) -> None:
    """Rank 0's watchdog: a rank that exits with an error takes the whole job down, loudly,
    instead of leaving rank 0 blocked in a collective."""
    while not done.wait(0.5):
        for r, w in enumerate(workers, start=1):
            if w.exitcode not in (None, 0):
                print(f"moerun: rank {r} exited with code {w.exitcode}; stopping", file=sys.stderr,
                      flush=True)  # fmt: skip
                os._exit(1)


class Workers(list):
    """Ranks 1..N-1 as processes; join() waits for them and stops the watchdog."""

    def __init__(self, processes: list, done: threading.Event) -> None:
        super().__init__(processes)
        self.done = done

    def join(self, timeout: float = 60) -> list[int]:
        """The ranks that failed."""
        for w in self:
            w.join(timeout=timeout)
        self.done.set()
        return [r for r, w in enumerate(self, start=1) if w.exitcode != 0]


def spawn_ranks(size: int, fn: Callable, *args: Any, device: str = "cpu") -> Workers:
    """Ranks 1..N-1 of this machine run fn(rank, size, *args) (fresh processes: fn and args
    must pickle); this process joins the group as rank 0 and returns the workers."""
    if size < 1:
        raise MoerunError(f"--tensor-parallel-size must be >= 1, got {size}")
    port = _free_port()
    ctx = mp.get_context("spawn")
    processes = [ctx.Process(target=_rank_main, args=(r, size, port, device, fn, args),
                             daemon=True) for r in range(1, size)]  # fmt: skip
    workers = Workers(processes, threading.Event())
    for w in workers:
        w.start()
    threading.Thread(target=_watch, args=(workers, workers.done), daemon=True,
                     name="rank-watchdog").start()  # fmt: skip
    _join(0, size, port, device)
    return workers


def run_ranks(size: int, fn: Callable, *args: Any, device: str = "cpu") -> Any:
    """fn(rank, size, *args) on `size` ranks of this machine; rank 0's result."""
    workers = spawn_ranks(size, fn, *args, device=device)
    try:
        result = fn(0, size, *args)
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()  # closing the connections frees ranks stuck in a collective
        workers.join()
        raise
    # the others leave first: this rank hosts the rendezvous store they still talk to
    failed = workers.join()
    dist.destroy_process_group()
    if failed:
        raise MoerunError(f"rank(s) {failed} of {size} failed (see their messages above)")
    return result
