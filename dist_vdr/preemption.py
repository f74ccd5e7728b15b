"""Stop at a step boundary that every rank agrees on, after a preemption / time-limit signal.

SLURM (``--signal=USR2@90``, or submitit) warns a job before killing it, but the signal may reach
one rank only (submitit acts on global rank 0), and under DeepSpeed/FSDP a checkpoint is a
collective: it cannot be written from one rank's signal handler. So the handler only sets a flag;
at the end of every optimizer step the ranks all-reduce it (one tiny collective), and when any
rank has it, all of them save the same checkpoint together and leave the training loop. The
caller (submitit job or sbatch script) then requeues the job, which resumes from that checkpoint.
"""

from __future__ import annotations

import signal
import threading

from . import distributed

_flag = threading.Event()
_waiter: threading.Thread | None = None


def install(signals: tuple[str, ...] = ("SIGUSR2",)) -> None:
    """Turn ``signals`` into the flag. Call it first thing in the process, before any other thread starts.

    A Python signal handler is not enough here: the kernel hands a process-directed signal to ANY
    thread that does not block it, and when that is one of gloo's/NCCL's C++ threads, its
    interrupted system call ends the process (seen: "terminate called without an active exception",
    SIGABRT, on a rank of a real SLURM job). So the signals are blocked in this thread -- every
    thread created later inherits the mask -- and one daemon thread takes them with sigwait.
    The default disposition is restored first: an inherited SIG_IGN (see slurm/node_launch.sh, which
    shields the launcher) would discard the signal before sigwait could see it. Idempotent.
    """
    global _waiter
    if _waiter is not None:
        return
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("preemption.install() must run in the main thread")
    signums = {getattr(signal, name) for name in signals}
    for signum in signums:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_BLOCK, signums)
    _waiter = threading.Thread(target=_wait_for, args=(signums,), name="dist-vdr-preemption", daemon=True)
    _waiter.start()


def _wait_for(signums: set[int]) -> None:
    while True:
        signum = signal.sigwait(signums)
        _flag.set()
        print(f"[dist-vdr] received {signal.Signals(signum).name}: saving a checkpoint at the next step boundary",
              flush=True)


def requested() -> bool:
    return _flag.is_set()


def reset() -> None:
    _flag.clear()


def make_callback():
    """TrainerCallback: at each step end, agree (all ranks) whether to checkpoint and stop."""
    from transformers import TrainerCallback

    class PreemptionCallback(TrainerCallback):
        def __init__(self) -> None:
            self.stopped_at: int | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if distributed.any_rank(_flag.is_set()) and state.global_step < state.max_steps:
                control.should_save = True
                control.should_training_stop = True
                self.stopped_at = state.global_step
            return control

    return PreemptionCallback()
