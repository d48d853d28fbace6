"""Several processes, started by `torchrun`: the process group, each rank's share of a batch, the
gradient sum, and FSDP2 sharding of the frozen model.

    torchrun --nproc_per_node=N train.py ...   (the same flags as one process)

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address; `init_world` joins the group
(nccl on CUDA, gloo on CPU). Every rank holds every row and the whole prompt, and builds the same
global batches; rank r trains on rows r, r + N, r + 2N, ... of each. Its micro-batch losses are
weighted by their share of the *global* step's labelled tokens, so the sum of the ranks' gradients
is the gradient one process computes for the whole step: one all-reduce of the [V, D] prompt
gradient (a few kilobytes) per step, the only trainable tensor. DDP would make the same single
all-reduce but needs the forward to run through its wrapper and every rank to do the same number of
backward passes; the plain all-reduce needs neither.

`--fsdp` shards the frozen transformer blocks with `fully_shard`; the input embedding and the LM
head stay whole on every rank (the prompt's text init reads embedding rows and the chunked loss
reads the head's weight directly, outside any forward FSDP could hook), as does the prompt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from datetime import timedelta

import torch
import torch.distributed as dist

# A collective that waits longer than this for a rank fails (a rank that dies is normally noticed
# at once: gloo sees its connection close, and torchrun stops the others).
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place among the ranks; a run without torchrun is a world of one."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files and prints progress."""
        return self.rank == 0

    def share(self, indices: list[int]) -> list[int]:
        """This rank's rows of a global batch: every `size`-th row from `rank` on. Rows of a
        length-grouped batch come longest first, so the shares pad to similar lengths."""
        return indices[self.rank :: self.size]

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place."""
        if self.size > 1:
            dist.all_reduce(tensor)
        return tensor

    def max(self, value: int, device: torch.device) -> int:
        """The largest of the ranks' `value`s, on every rank (e.g. a signal some ranks only received)."""
        if self.size == 1:
            return value
        tensor = torch.tensor([value], device=device, dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (e.g. writing files); the others after it has finished."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def init_world(device: torch.device) -> tuple[World, torch.device]:
    """(this process's World, its device): under torchrun (WORLD_SIZE > 1) the process group is
    joined, once, and a CUDA rank takes the GPU LOCAL_RANK; otherwise a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(), device
    world = World(rank=int(os.environ["RANK"]), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"torchrun runs on CUDA (nccl) or the CPU (gloo), not {device.type}: pass --device cpu")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT, device_id=device if device.type == "cuda" else None)
    return world, device


def close_world() -> None:
    """Leave the process group (at the end of `train.py`), if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def shard_frozen_model(base_model: torch.nn.Module) -> int:
    """Shard the frozen model's transformer blocks (the classes its `_no_split_modules` names, as
    Accelerate's FSDP wrapping picks them) and the rest of the decoder, except the input embedding
    and the LM head, across the ranks with FSDP2. Returns the number of blocks sharded."""
    from torch.distributed.fsdp import fully_shard

    block_names = set(getattr(base_model, "_no_split_modules", None) or [])
    blocks = [module for module in base_model.modules() if type(module).__name__ in block_names]
    if not blocks:
        raise ValueError(f"--fsdp: {type(base_model).__name__} names no transformer blocks (_no_split_modules) to shard")
    for block in blocks:
        fully_shard(block)
    whole = {base_model.get_input_embeddings().weight, base_model.get_output_embeddings().weight}
    fully_shard(base_model.get_decoder(), ignored_params=whole)  # the final norm and what else the decoder holds
    return len(blocks)
