"""The one module that talks to torch.distributed.

Everything else receives a :class:`DistInfo` (rank, world size) or calls the helpers here, so losses,
evaluators and checkpoint logic can be unit-tested without a process group. The process group itself
is created by accelerate's ``PartialState`` (which the HF Trainer then reuses through
``accelerator_config={"use_configured_state": True}``), with gloo on CPU and NCCL on GPUs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from dist_vdr import compat, log

T = TypeVar("T")


class AllRanksError(ValueError):
    """A user error raised on every rank at once (rank 0 decided): reported once, by rank 0."""


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
    import sys

    if "torch.distributed" not in sys.modules:  # never imported: no group (and no 1.5 s torch import)
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def init(device: str = "auto", expected_world_size: int = 0, num_threads: int = 0,
         timeout_s: int = 600) -> DistInfo:
    """Join the process group the launcher prepared and return this process's place in it.

    ``device``: auto (CUDA if available, else CPU/gloo), cpu or cuda. Raises ValueError when the
    launch does not give the world size the user asked for: the classic trap is
    ``accelerate launch --cpu --num_processes 2`` (one process) or torchrun on CPU without gloo
    (two independent single-process runs). ``timeout_s`` bounds every collective: when a rank dies
    the others fail within that time instead of hanging.
    """
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("launch.device=cuda but no CUDA device is visible; use launch.device=cpu or auto")
    use_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    engine = requested_engine()
    kwargs: dict[str, Any] = {"timeout": timedelta(seconds=timeout_s)} if launched_world_size() > 1 else {}
    if use_cpu and engine:
        # accelerate's CPU state (cpu=True) never takes the DeepSpeed/FSDP path: it would silently
        # train with DDP. A gloo group without cpu=True keeps the engine; DeepSpeed must also pick
        # its CPU accelerator before its first import.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if engine == "deepspeed" and os.environ["DS_ACCELERATOR"] != "cpu":
            raise ValueError(f"DeepSpeed on CPU needs DS_ACCELERATOR=cpu (it is {os.environ['DS_ACCELERATOR']!r})")
        state = PartialState(backend="gloo", **kwargs)
        if engine == "fsdp" and "LOCAL_RANK" in os.environ:
            # accelerate upgrades only a GPU-type state to FSDP; a gloo group on CPU is typed NO.
            # fully_shard itself runs on CPU with gloo, so present the group as multi-device.
            compat.present_as_multi_device(state)
    else:
        state = PartialState(cpu=use_cpu, **kwargs)
    info = DistInfo(
        rank=state.process_index,
        world_size=state.num_processes,
        local_rank=state.local_process_index,
        device="cpu" if use_cpu else str(state.device),
    )
    log.set_rank(info.rank, info.world_size)
    announced = launched_world_size()
    if info.world_size != announced:
        raise ValueError(
            f"the launcher started {announced} processes but they did not join one process group "
            f"(this process sees world size {info.world_size}); on CPU launch with launch/cpu.yaml "
            f"(see docs/usage.md), not `accelerate launch --cpu`"
        )
    if expected_world_size and info.world_size != expected_world_size:
        raise ValueError(
            f"launch.expected_world_size={expected_world_size} but {info.world_size} process(es) joined; "
            f"check the launcher's --num_processes / config file"
        )
    return info


_was_initialized = False


def was_initialized() -> bool:
    """Whether this process joined a process group (even one destroyed since)."""
    return _was_initialized or _is_initialized()


def shutdown() -> None:
    """Leave the process group cleanly: all ranks meet, then the group is destroyed.

    Exiting with a live gloo group lets its threads be torn down by static destructors while the
    interpreter exits; rarely (a few in a hundred launches, more under load) that aborted a rank
    with "terminate called without an active exception" after all its work was done.
    """
    if not _is_initialized():
        return
    import torch.distributed as dist

    global _was_initialized
    _was_initialized = True
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


def requested_engine() -> str | None:
    """The sharded engine the launcher's accelerate config asked for ("deepspeed", "fsdp"), if any."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    return None


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


def main_then_share(is_main: bool, fn: Callable[[], T], timeout_s: int | None = None,
                    waiting_for: str = "rank 0", log: Callable[[str], None] | None = None) -> T:
    """Run ``fn`` on rank 0 only and give its result to every rank; a ValueError there is raised everywhere.

    Rank 0 decides (resume point, data validity), the others must not decide on their own. For
    long work (minutes: a checkpoint conversion, a data pass) give ``timeout_s``: the others then
    wait in a barrier with that bound of its own and a progress line a minute (:func:`wait_long`),
    not inside the default group's timed broadcast.
    """
    result: tuple = (None, None)
    if is_main:
        try:
            result = (fn(), None)
        except ValueError as exc:
            result = (None, str(exc))
        except OSError as exc:  # a full disk or a read-only folder: said once, on every rank (no rank left waiting)
            from dist_vdr.outputs import explain

            message = explain(exc)
            if message is None:
                raise
            result = (None, message)
    if timeout_s is not None and _is_initialized():
        wait_long(timeout_s, waiting_for, log)
    value, error = broadcast_object(result)
    if error:
        raise AllRanksError(error)
    return value


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous [start, end) of rank's shard of n items; the first n % W shards get one extra."""
    size, extra = divmod(n, world_size)
    start = rank * size + min(rank, extra)
    return start, start + size + (rank < extra)


def shard_sizes(n: int, world_size: int) -> list[int]:
    """Every rank's shard size of n items (:func:`shard_range`), in rank order."""
    return [end - start for start, end in (shard_range(n, r, world_size) for r in range(world_size))]


def all_gather_objects(obj: Any, timeout_s: int | None = None, waiting_for: str = "the other ranks",
                       log: Callable[[str], None] | None = None) -> list[Any]:
    """Every rank's ``obj``, in rank order.

    ``timeout_s``: the ranks arrive after long work of their own (a data pass, a conversion) and
    may arrive minutes apart: first meet in a barrier of a gloo group with this timeout -- not the
    step-sized ``launch.collective_timeout_s`` of the default group -- saying every minute what is
    awaited, then exchange the objects (everyone is there: no long wait inside a timed collective).
    """
    if not _is_initialized():
        return [obj]
    import torch.distributed as dist

    if timeout_s is not None:
        wait_long(timeout_s, waiting_for, log)
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


_long_groups: dict[int, Any] = {}
_PROGRESS_EVERY_S = 60.0


def wait_long(timeout_s: int, waiting_for: str, log: Callable[[str], None] | None = None) -> None:
    """All ranks meet, waiting up to ``timeout_s`` (its own gloo group), with a progress line a minute."""
    import time
    from datetime import timedelta

    import torch.distributed as dist

    if timeout_s not in _long_groups:  # collective: every rank creates it at the same point
        _long_groups[timeout_s] = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    work = dist.barrier(group=_long_groups[timeout_s], async_op=True)
    start = last = time.monotonic()
    while not work.is_completed():
        time.sleep(0.05)
        if log and time.monotonic() - last >= _PROGRESS_EVERY_S:
            last = time.monotonic()
            log(f"waiting for {waiting_for} ({last - start:.0f} s; bound launch.startup_timeout_s={timeout_s})")
    work.wait()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (an all-reduce MAX)."""
    return any_ranks([flag])[0]


def any_ranks(flags: list[bool]) -> list[bool]:
    """Per position, True on every rank when it is true on at least one: several flags, one all-reduce."""
    if not _is_initialized():
        return list(flags)
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


# ----------------------------------------------------------------------------------------------
# Embedding collectives of the global-batch loss, and a counter of every collective issued.
# ----------------------------------------------------------------------------------------------

def all_gather_stacked(tensor, world_size: int):
    """All-gather ``tensor`` (same shape on every rank) into a new ``[world_size, *shape]`` tensor.

    No autograd: the caller returns gradients to the owners itself (:func:`sum_to_owner`), once per step.
    """
    import torch
    import torch.distributed as dist

    tensor = tensor.detach().contiguous()
    if world_size == 1:
        return tensor.unsqueeze(0).clone()
    out = torch.empty((world_size, *tensor.shape), dtype=tensor.dtype, device=tensor.device)
    if dist.get_backend() == "gloo":
        dist.all_gather(list(out.unbind(0)), tensor)
    else:
        dist.all_gather_into_tensor(out, tensor)
    return out


def sum_to_owner(grads, rank: int, world_size: int):
    """Sum ``grads`` (``[world_size, ...]``, one slice per owner rank) over all ranks; return this rank's slice.

    One reduce-scatter on NCCL; gloo has no reduce-scatter, so one all-reduce and a slice there.
    """
    import torch
    import torch.distributed as dist

    grads = grads.contiguous()
    if world_size == 1:
        return grads[0]
    if dist.get_backend() == "gloo":
        dist.all_reduce(grads)
        return grads[rank]
    out = torch.empty_like(grads[0])
    dist.reduce_scatter_tensor(out, grads)  # input = the stack of the per-owner slices
    return out


def max_over_ranks(value: int, world_size: int) -> int:
    """The largest ``value`` over the ranks: one all-reduce (MAX) of one integer; none for one rank."""
    import torch
    import torch.distributed as dist

    if world_size == 1:
        return int(value)
    box = torch.tensor([int(value)], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return int(box.item())


_COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_reduce", "reduce_scatter", "reduce_scatter_tensor",
                "scatter", "gather", "all_to_all", "all_to_all_single", "broadcast", "reduce", "barrier",
                "all_gather_object", "broadcast_object_list", *compat.TORCH_PRIVATE_COLLECTIVES,
                # torch >= 2.13 single-tensor forms (FSDP2 uses these)
                "all_gather_single", "reduce_scatter_single", "all_reduce_coalesced", "all_gather_coalesced",
                "gather_single", "gather_into_tensor", "scatter_object_list", "gather_object")


@dataclass
class CollectiveCount:
    """Calls and payload bytes of torch.distributed collectives, by name."""

    calls: dict
    bytes: int = 0

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def _payload_bytes(args, kwargs) -> int:
    import torch

    total = 0
    for value in list(args) + list(kwargs.values()):
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if isinstance(item, torch.Tensor):
                total += item.numel() * item.element_size()
    return total


class count_collectives:
    """Context manager counting every collective this process issues through ``torch.distributed``.

    It wraps the module-level functions, so it sees sentence-transformers' gathers, autograd
    collectives (torch.distributed.nn) and DDP reductions routed through a Python comm hook
    (:func:`register_counting_comm_hook`). Not thread-safe; meant for tests and benchmarks.
    """

    def __init__(self) -> None:
        self.count = CollectiveCount(calls={})
        self._saved: dict = {}

    def __enter__(self) -> CollectiveCount:
        import torch.distributed as dist

        for name in _COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self._saved[name] = fn

            def wrapped(*args, __fn=fn, __name=name, **kwargs):
                self.count.calls[__name] = self.count.calls.get(__name, 0) + 1
                self.count.bytes += _payload_bytes(args, kwargs)
                return __fn(*args, **kwargs)

            setattr(dist, name, wrapped)
        return self.count

    def __exit__(self, *exc) -> None:
        import torch.distributed as dist

        for name, fn in self._saved.items():
            setattr(dist, name, fn)


def register_counting_comm_hook(ddp_model) -> None:
    """Route DDP's gradient all-reduce through Python (the stock allreduce hook) so the counter sees it."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    ddp_model.register_comm_hook(None, default_hooks.allreduce_hook)


def spawn_gloo(fn, world_size: int, args: tuple, workdir: str, threads_per_rank: int = 1) -> None:
    """Run ``fn(rank, *args)`` in ``world_size`` fresh processes joined by a gloo group.

    For benchmarks and tools that need a process group without a launcher (a file rendezvous in
    ``workdir``). Raises if any process fails.
    """
    import torch.multiprocessing as mp

    init_file = os.path.join(workdir, "gloo-rendezvous")
    if os.path.exists(init_file):
        os.remove(init_file)
    mp.start_processes(_gloo_entry, args=(world_size, init_file, fn, args, threads_per_rank), nprocs=world_size,
                       join=True, start_method="spawn")


def _gloo_entry(rank: int, world_size: int, init_file: str, fn, args: tuple, threads: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        fn(rank, *args)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _comm_device():
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_gather_same(tensor):
    """All-gather a tensor of the same shape on every rank into ``[world_size, *shape]`` (CPU result)."""
    import torch
    import torch.distributed as dist

    if not _is_initialized():
        return tensor.unsqueeze(0)
    dev = _comm_device()
    local = tensor.contiguous().to(dev)
    out = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(out, local)
    return torch.stack(out).cpu()


def all_gather_rows(tensor, sizes: list[int]):
    """Concatenate every rank's rows (rank r holds ``sizes[r]`` rows, known to all) in rank order."""
    import torch

    if not _is_initialized():
        return tensor
    width = max(sizes)
    trailing = tensor.shape[1:] if tensor.shape[0] else None
    # A rank with no rows cannot tell the row shape; share it (rank with the most rows has it).
    if trailing is None or any(s == 0 for s in sizes):
        shapes = all_gather_objects(tuple(tensor.shape[1:]) if tensor.shape[0] else None)
        trailing = next(s for s in shapes if s is not None)
    padded = torch.zeros((width, *trailing), dtype=tensor.dtype)
    if tensor.shape[0]:
        padded[: tensor.shape[0]] = tensor
    gathered = all_gather_same(padded)
    return torch.cat([gathered[r, :n] for r, n in enumerate(sizes)])
