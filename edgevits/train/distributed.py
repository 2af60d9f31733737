"""One process or many (torchrun): the process group, collectives that work on CPU (gloo) and GPU (nccl), and the
random states every process saves and restores for an exact resume."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Runtime:
    """Where this process runs: its rank, the number of processes, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_runtime(device: str = "auto") -> Runtime:
    """Read torchrun's environment; start the process group (nccl on GPU, gloo on CPU) when there are 2+ processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    rt = Runtime(rank, world, local, dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        rt.owns_group = True
    return rt


def all_reduce(t: torch.Tensor, rt: Runtime, op=None) -> torch.Tensor:
    """Reduce ``t`` over the processes in place (a sum unless ``op``) and return it. The collective runs on
    ``rt.device`` (NCCL reduces CUDA tensors only, gloo CPU ones): a tensor elsewhere is reduced as a copy there."""
    if rt.world_size > 1:
        buf = t if t.device == rt.device else t.to(rt.device)
        dist.all_reduce(buf, op=op or dist.ReduceOp.SUM)
        if buf is not t:
            t.copy_(buf)
    return t


def any_process(flag: bool, rt: Runtime) -> bool:
    """``flag`` OR-ed over the processes (collective when there are 2+: every process must call it)."""
    if rt.world_size == 1:
        return flag
    return bool(all_reduce(torch.tensor([float(flag)], device=rt.device), rt, dist.ReduceOp.MAX).item())


def rng_state(device: torch.device) -> dict:
    """This process's random state: the CPU generator's, and that of the GPU it trains on (only that one: touching
    every visible GPU would open a CUDA context on each from every process)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore ``rng_state``; a GPU state is restored on ``device`` only (a CPU run ignores it)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # written by earlier versions: one state per visible GPU
        cuda = cuda[min(device.index or 0, len(cuda) - 1)] if cuda else None
    if device.type == "cuda" and cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def gather_rng(rt: Runtime) -> list[dict]:
    """Every process's RNG state (collective: all processes call it); rank 0 gets the list."""
    mine = rng_state(rt.device)
    if rt.world_size == 1:
        return [mine]
    states = [None] * rt.world_size
    dist.all_gather_object(states, mine)
    return states
