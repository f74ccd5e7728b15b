"""Preemption signal handling: blocked in every thread, taken by one sigwait thread, agreed at a step end."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

_PROBE = r"""
import os, signal, threading, time
signal.signal(signal.SIGUSR2, signal.SIG_IGN)   # as inherited from slurm/node_launch.sh's shielded launcher
from dist_vdr.run import preemption
preemption.install()
masks = {}
def worker():
    masks["thread"] = signal.SIGUSR2 in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    time.sleep(3)
t = threading.Thread(target=worker); t.start(); time.sleep(0.2)
masks["main"] = signal.SIGUSR2 in signal.pthread_sigmask(signal.SIG_BLOCK, [])
os.kill(os.getpid(), signal.SIGUSR2)
deadline = time.time() + 5
while not preemption.requested() and time.time() < deadline:
    time.sleep(0.01)
print("blocked", masks["main"], masks["thread"], "flag", preemption.requested(), flush=True)
"""


def test_signal_is_blocked_in_all_threads_and_sets_the_flag():
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "blocked True True flag True" in proc.stdout
    assert "received SIGUSR2" in proc.stdout


def test_callback_saves_and_stops_at_the_step_boundary():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from dist_vdr.run import preemption
    from dist_vdr.run.callbacks import PreemptionCallback

    cb = PreemptionCallback()
    state, control = TrainerState(), TrainerControl()
    state.global_step, state.max_steps = 5, 10
    args = TrainingArguments(output_dir="/tmp/unused", report_to="none", use_cpu=True)
    preemption.reset()
    cb.on_step_end(args, state, control)
    assert not control.should_save and not control.should_training_stop and cb.stopped_at is None
    preemption._flag.set()
    try:
        cb.on_step_end(args, state, control)
        assert control.should_save and control.should_training_stop and cb.stopped_at == 5
        last = TrainerControl()
        state.global_step = 10  # the last step: finish normally, no early stop
        cb2 = PreemptionCallback()
        cb2.on_step_end(args, state, last)
        assert not last.should_training_stop and cb2.stopped_at is None
    finally:
        preemption.reset()
