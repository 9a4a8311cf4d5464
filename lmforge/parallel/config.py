"""The `parallel` config section: how one training run is spread over processes and devices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmforge.core.config import option, require

DataParallel = Literal["none", "ddp", "fsdp"]
Checkpointing = Literal["none", "full", "every_n"]
MixedDtype = Literal["auto", "fp32", "bf16"]
PipelineSchedule = Literal["gpipe", "1f1b", "interleaved-1f1b"]


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
    pipeline: int = option(1, "pipeline-parallel degree P: the blocks cut into P stages at block boundaries "
                              "(embedding on the first, final norm, head and loss on the last), one per process "
                              "along the mesh's pp dimension (torch.distributed.pipelining); world size = "
                              "P x data-parallel size x parallel.tensor")
    pipeline_schedule: PipelineSchedule = option(
        "1f1b", "pipeline schedule: gpipe (all forwards, then all backwards: most activation memory), 1f1b (one "
                "forward one backward in steady state: at most P micro-batches in flight), interleaved-1f1b (two "
                "stages per process, looped: a smaller bubble for more point-to-point traffic)")
    microbatches: int = option(0, "micro-batches the pipeline splits each rank's batch into (it must divide it); "
                                  "0 = 2 x parallel.pipeline. The bubble is (P-1)/(M+P-1) of a step")
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
        require(self.pipeline >= 1, "parallel.pipeline", self.pipeline, ">= 1")
        require(self.microbatches >= 0, "parallel.microbatches", self.microbatches, ">= 0 (0 = 2 x pipeline)")
        require(self.pipeline > 1 or self.microbatches == 0, "parallel.microbatches", self.microbatches,
                "0 unless parallel.pipeline > 1 (micro-batches are the pipeline's; use train.grad_accum "
                "otherwise)")
        m = self.n_microbatches
        require(self.pipeline_schedule == "gpipe" or m >= self.pipeline, "parallel.microbatches", m,
                f">= parallel.pipeline={self.pipeline} with the {self.pipeline_schedule} schedule")
        require(self.pipeline_schedule != "interleaved-1f1b" or m % self.pipeline == 0, "parallel.microbatches",
                m, f"a multiple of parallel.pipeline={self.pipeline} with interleaved-1f1b")
        require(self.expert >= 1, "parallel.expert", self.expert, ">= 1")
        require(self.expert == 1 or (self.data == "ddp" and self.tensor == 1), "parallel.expert", self.expert,
                "1 unless parallel.data=ddp and parallel.tensor=1 (expert parallelism composes with ddp only)")
        require(self.expert == 1 or self.pipeline == 1, "parallel.expert", self.expert,
                "1 with parallel.pipeline > 1 (pipeline stages of MoE models are not supported yet)")
        require(self.ac_every >= 1, "parallel.ac_every", self.ac_every, ">= 1")
        require(self.data != "ddp" or self.tensor == 1, "parallel.data", self.data,
                "fsdp (2-D FSDP x TP) or none when parallel.tensor > 1 (ddp cannot be combined with tensor "
                "parallelism)")
        # an option the chosen layout would not read is refused, not silently ignored
        require(self.reshard_after_forward or self.data == "fsdp", "parallel.reshard_after_forward",
                self.reshard_after_forward, "true (the default) unless parallel.data=fsdp: only FSDP reshards")
        require(self.param_dtype == "auto" or self.data == "fsdp", "parallel.param_dtype", self.param_dtype,
                "auto unless parallel.data=fsdp: only FSDP casts the gathered parameters")
        require(self.reduce_dtype == "auto" or self.data != "none", "parallel.reduce_dtype", self.reduce_dtype,
                "auto unless parallel.data is ddp or fsdp: no gradient is reduced otherwise")
        require(self.ac_every == 2 or self.activation_checkpointing == "every_n", "parallel.ac_every", self.ac_every,
                "left at 2 unless parallel.activation_checkpointing=every_n")
        require(self.backend == "auto" or self.enabled, "parallel.backend", self.backend,
                "auto unless parallel.data is ddp or fsdp (or parallel.tensor > 1): no process group is made")

    @property
    def enabled(self) -> bool:
        """True when the run needs a process group even with one process."""
        return self.data != "none" or self.tensor > 1 or self.pipeline > 1 or self.expert > 1

    @property
    def n_microbatches(self) -> int:
        """Micro-batches per pipeline step (parallel.microbatches, 0 resolved to 2 x pipeline)."""
        return self.microbatches or 2 * self.pipeline

    @property
    def stages_per_rank(self) -> int:
        """Pipeline stages each process holds: 2 for the interleaved schedule (virtual stages), else 1."""
        return 2 if self.pipeline_schedule == "interleaved-1f1b" else 1
