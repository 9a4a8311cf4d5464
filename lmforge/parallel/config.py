"""The `parallel` config section: how one training run is spread over processes and devices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmforge.core.config import option, require

DataParallel = Literal["none", "ddp", "fsdp"]
Checkpointing = Literal["none", "full", "every_n"]
MixedDtype = Literal["auto", "fp32", "bf16"]


@dataclass
class ParallelConfig:
    data: DataParallel = option("none", "data parallelism over the processes torchrun starts: ddp replicates the "
                                        "model and all-reduces gradients; fsdp (FSDP2 fully_shard) shards "
                                        "parameters, gradients and optimizer state (ZeRO-3). none with one "
                                        "process keeps the plain single-device loop")
    reshard_after_forward: bool = option(True, "fsdp: free the gathered parameters after each block's forward "
                                               "and gather again for backward (ZeRO-3, least memory); false "
                                               "keeps them until backward (ZeRO-2-like: one all-gather per step, "
                                               "more memory)")
    tensor: int = option(1, "tensor-parallel degree K: attention heads and MLP hidden units split over K "
                            "processes (Megatron column/row plan); world size = K x data-parallel size")
    expert: int = option(1, "expert-parallel degree EP: each MoE layer's routed experts are split over EP processes "
                            "and tokens reach their expert by all-to-all (router and dense weights stay "
                            "replicated); needs parallel.data=ddp, EP must divide the number of processes and "
                            "model.moe_experts, and every process reads its own slice of the batch")
    activation_checkpointing: Checkpointing = option(
        "none", "recompute block activations in backward instead of storing them: full = every block, "
                "every_n = every parallel.ac_every-th block (trades ~1/3 more compute for memory)")
    ac_every: int = option(2, "every_n only: checkpoint one block in this many")
    param_dtype: MixedDtype = option("auto", "fsdp: dtype of the gathered parameters the matmuls see (fp32 "
                                             "master weights stay sharded); auto = bf16 on CUDA, fp32 on CPU")
    reduce_dtype: MixedDtype = option("auto", "fsdp/ddp: dtype of gradient reduce-scatter/all-reduce; auto = "
                                              "bf16 on CUDA, fp32 on CPU (exact on CPU)")
    backend: Literal["auto", "gloo", "nccl"] = option("auto", "process-group backend; auto = nccl on CUDA, "
                                                               "gloo on CPU")

    def __post_init__(self) -> None:
        require(self.tensor >= 1, "parallel.tensor", self.tensor, ">= 1")
        require(self.expert >= 1, "parallel.expert", self.expert, ">= 1")
        require(self.expert == 1 or (self.data == "ddp" and self.tensor == 1), "parallel.expert", self.expert,
                "1 unless parallel.data=ddp and parallel.tensor=1 (expert parallelism composes with ddp only)")
        require(self.ac_every >= 1, "parallel.ac_every", self.ac_every, ">= 1")
        require(self.data != "ddp" or self.tensor == 1, "parallel.data", self.data,
                "fsdp (2-D FSDP x TP) or none when parallel.tensor > 1 (ddp cannot be combined with tensor "
                "parallelism)")

    @property
    def enabled(self) -> bool:
        """True when the run needs a process group even with one process."""
        return self.data != "none" or self.tensor > 1 or self.expert > 1
