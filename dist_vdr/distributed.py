"""The one module that talks to torch.distributed.

Everything else receives a :class:`DistInfo` (rank, world size) or calls the helpers here, so losses,
evaluators and checkpoint logic can be unit-tested without a process group. The process group itself
is created by accelerate's ``PartialState`` (which the HF Trainer then reuses through
``accelerator_config={"use_configured_state": True}``), with gloo on CPU and NCCL on GPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    """World size the launcher announced (torchrun/accelerate set WORLD_SIZE; submitit via its helper)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _is_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def init(device: str = "auto", expected_world_size: int = 0, num_threads: int = 0) -> DistInfo:
    """Join the process group the launcher prepared and return this process's place in it.

    ``device``: auto (CUDA if available, else CPU/gloo), cpu or cuda. Raises ValueError when the
    launch does not give the world size the user asked for: the classic trap is
    ``accelerate launch --cpu --num_processes 2`` (one process) or torchrun on CPU without gloo
    (two independent single-process runs).
    """
    import torch
    from accelerate import PartialState

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("launch.device=cuda but no CUDA device is visible; use launch.device=cpu or auto")
    use_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    state = PartialState(cpu=use_cpu)
    info = DistInfo(
        rank=state.process_index,
        world_size=state.num_processes,
        local_rank=state.local_process_index,
        device="cpu" if use_cpu else str(state.device),
    )
    announced = launched_world_size()
    if info.world_size != announced:
        raise ValueError(
            f"the launcher started {announced} processes but they did not join one process group "
            f"(this process sees world size {info.world_size}); on CPU launch with launch/cpu.yaml "
            f"(see README), not `accelerate launch --cpu`"
        )
    if expected_world_size and info.world_size != expected_world_size:
        raise ValueError(
            f"launch.expected_world_size={expected_world_size} but {info.world_size} process(es) joined; "
            f"check the launcher's --num_processes / config file"
        )
    return info


def current() -> DistInfo:
    """DistInfo of an already-initialised process (single process when none)."""
    if not _is_initialized():
        return DistInfo()
    import torch.distributed as dist

    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def barrier() -> None:
    if _is_initialized():
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src`` decides, everybody receives (resume path, run name, ...)."""
    if not _is_initialized():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    if not _is_initialized():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (an all-reduce MAX)."""
    if not _is_initialized():
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
