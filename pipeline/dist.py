"""torch.distributed for gsp under torchrun: one process per GPU (or CPU slot), any number of nodes.

    torchrun --nproc-per-node 8 -m stages fit --store ... --batch-size 8192
    torchrun --nnodes 2 --node-rank 0 --master-addr HOST --nproc-per-node 8 -m stages fit ...

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them gsp runs as one process and every
helper here is a no-op. The backend is NCCL on CUDA and gloo on the CPU (the tests run 2 gloo
processes on this machine's CPU).
"""

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.errors import GspError
from pipeline.models import resolve_device


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str) -> Group:
    """Join the torchrun group (if launched by torchrun) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world == 1:
        return Group(0, 1, dev)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        if local >= torch.cuda.device_count():
            raise GspError(
                f"local rank {local} has no GPU ({torch.cuda.device_count()} visible); lower --nproc-per-node"
            )
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Group(dist.get_rank(), dist.get_world_size(), dev)


def teardown(group: Group) -> None:
    if group.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device: str) -> Iterator[Group]:
    """`setup(device)` for the length of a `with` block, torn down however the block ends: after a
    barrier when it ends normally, at once on an error (a barrier then could wait for ever on a
    process that has already left), so that no process group outlives a stage that failed."""
    group = setup(device)
    try:
        yield group
    except BaseException:
        if group.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
        raise
    teardown(group)


def barrier(group: Group) -> None:
    if group.world > 1:
        dist.barrier()


def mean_(group: Group, tensors: list[torch.Tensor]) -> None:
    """Average tensors across processes in place, in one flat all-reduce."""
    if group.world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= group.world
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def min_(group: Group, t: torch.Tensor) -> None:
    """Element-wise minimum of a tensor across processes, in place."""
    if group.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)


def any_(group: Group, mask: torch.Tensor) -> torch.Tensor:
    """Element-wise OR of a boolean tensor across processes."""
    if group.world == 1:
        return mask
    m = mask.to(torch.int32)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    return m.bool()


def mean_differentiable(group: Group, x: torch.Tensor) -> torch.Tensor:
    """The cross-process mean of a tensor, with gradients flowing back to each process's share."""
    if group.world == 1:
        return x
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x) / group.world


def gather(group: Group, obj, pg=None):
    """Every process's `obj` (picklable, on the CPU), in rank order, on every process; `pg`: a
    process group other than the default (a cpu_group)."""
    if group.world == 1:
        return [obj]
    out = [None] * group.world
    dist.all_gather_object(out, obj, group=pg)
    return out


def cpu_group(group: Group):
    """A gloo group of all processes beside the default one, for collectives from a helper thread
    (NCCL's are for the main thread's device work; one group's collectives must not interleave)."""
    return dist.new_group(backend="gloo") if group.world > 1 else None


def on_main(group: Group, fn):
    """`fn()` on rank 0, its result (or its GspError) on every process."""
    if group.world == 1:
        return fn()
    box: list = [None]
    if group.main:
        try:
            box[0] = ("ok", fn())
        except GspError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise GspError(value)
    return value
