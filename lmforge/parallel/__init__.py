"""Parallelism applied from outside the model: DDP / FSDP2 data parallelism, tensor-parallel plans, activation
checkpointing, and the process-group setup and launching that torchrun drives."""

from lmforge.parallel.config import ParallelConfig
from lmforge.parallel.run import DistributedRun, setup_parallel

__all__ = ["DistributedRun", "ParallelConfig", "setup_parallel"]
