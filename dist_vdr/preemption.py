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
_installed: set[int] = set()


def install(signals: tuple[str, ...] = ("SIGUSR2",)) -> None:
    """Route ``signals`` to the flag (replacing other handlers, e.g. submitit's). Main thread only."""
    for name in signals:
        signum = getattr(signal, name)
        signal.signal(signum, _handler)
        _installed.add(signum)


def _handler(signum, frame) -> None:
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
