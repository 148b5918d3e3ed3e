"""Tensor and expert parallelism over torch.distributed (issue 17): shard.py (what a rank holds),
slicing.py (cutting a checkpoint), launch.py (starting ranks), tasks.py (what a rank runs)."""

import os


def under_torchrun() -> bool:
    """Whether this process is one rank of a torchrun job (its environment says so). Here, not
    in launch.py, so that the CLI can ask without importing torch."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ
