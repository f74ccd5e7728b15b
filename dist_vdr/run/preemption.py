"""Stop at a step boundary that every rank agrees on, after a preemption / time-limit signal.

SLURM (``--signal=USR2@90``, or submitit) warns a job before killing it, but the signal may reach
one rank only (submitit acts on global rank 0), and under DeepSpeed/FSDP a checkpoint is a
collective: it cannot be written from one rank's signal handler. So the handler only sets a flag;
at the end of every optimizer step the ranks all-reduce it (one tiny collective), and when any
rank has it, all of them save the same checkpoint together and leave the training loop. The
caller (submitit job or sbatch script) then requeues the job, which resumes from that checkpoint.
SIGTERM (``scancel``, a launcher stopping its workers) and SIGINT (Ctrl-C) are taken the same way:
the step is kept. A second signal while the first is pending exits at once (status 128 + signal),
for a run that cannot reach a step boundary.

The same all-reduce carries a second flag: a non-finite loss on any rank during the step. Then
every rank raises :class:`NonFiniteLoss` before the step is saved, so the newest checkpoint on
disk is the last good one (the Trainer's own NaN filter would log the average of earlier losses
and go on training a NaN model).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from dist_vdr import distributed, log

logger = log.get(__name__)

_flag = threading.Event()
_received: list[str] = []
_waiter: threading.Thread | None = None


STOP_SIGNALS = ("SIGUSR2", "SIGTERM", "SIGINT")


class NonFiniteLoss(distributed.AllRanksError):
    """The loss went NaN/inf: training stops before the step is saved (raised on every rank)."""


def stop_signums(signals: tuple[str, ...] = STOP_SIGNALS) -> set[int]:
    return {getattr(signal, name) for name in signals}


def install(signals: tuple[str, ...] = STOP_SIGNALS) -> None:
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
    signums = stop_signums(signals)
    for signum in signums:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_BLOCK, signums)
    _waiter = threading.Thread(target=_wait_for, args=(signums,), name="dist-vdr-preemption", daemon=True)
    _waiter.start()


def _wait_for(signums: set[int]) -> None:
    while True:
        signum = signal.sigwait(signums)
        name = signal.Signals(signum).name
        user_stop = signum != signal.SIGUSR2
        # A second SIGTERM/SIGINT means "now" (a run that cannot reach a step boundary). Not after a
        # USR2: SLURM sends SIGTERM at the time limit while the requested checkpoint may still be written.
        if user_stop and any(s != "SIGUSR2" for s in _received):
            logger.info(f"received {name} again: exiting without waiting for the step boundary", extra=log.ALL_RANKS)
            sys.stderr.flush()
            os._exit(128 + signum)
        _received.append(name)
        _flag.set()
        again = f" (send {name} again to exit at once)" if user_stop else ""
        logger.info(f"received {name}: saving a checkpoint at the next step boundary{again}", extra=log.ALL_RANKS)


def first_signal() -> str | None:
    """Name of the signal that asked for the stop (SIGUSR2: preemption / time limit, requeue wanted)."""
    return _received[0] if _received else None


def requested() -> bool:
    return _flag.is_set()


def reset() -> None:
    _flag.clear()
    _received.clear()


class StepHealth:
    """Whether a loss of the current optimizer step was not finite (the trainer reports every micro-step)."""

    def __init__(self) -> None:
        self.bad: str | None = None

    def observe(self, loss) -> None:
        import torch

        if self.bad is None and isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss).all()):
            self.bad = str(loss.detach().float().cpu().item())

    def take(self) -> str | None:
        bad, self.bad = self.bad, None
        return bad


def agree_at_step_end(health: StepHealth | None, step: int, output_dir: str) -> bool:
    """Every rank at each step end, one all-reduce: whether a stop signal reached any rank (checkpoint
    and stop). A non-finite loss on any rank raises :class:`NonFiniteLoss` on all of them, before the
    step is saved."""
    bad = health.take() if health is not None else None
    stop, non_finite = distributed.any_ranks([_flag.is_set(), bad is not None])
    if non_finite:
        where = f"loss {bad} on this rank" if bad is not None else "on another rank"
        raise NonFiniteLoss(
            f"the loss is not finite at step {step} ({where}): training stopped before "
            f"saving this step, so the newest checkpoint in {output_dir} is the last good one; "
            f"lower training.learning_rate, check the model weights and data, then rerun to resume")
    return stop
