"""Process lifetime of a training rank: die with the launcher, exit without native teardown.

- torch elastic (under ``accelerate launch`` and torchrun) starts each rank in a session of its
  own, so killing the launcher or its process group (``kill -9``, a terminal that closes) leaves
  the ranks training, writing checkpoints and ``final/`` with nobody watching -- and a rerun makes
  two writers. :func:`die_with_launcher` asks the kernel (Linux ``PR_SET_PDEATHSIG``) to SIGKILL
  the rank when its parent, the launcher's agent, dies.
- After a rank's work is done, interpreter teardown runs static destructors of native threads
  (gloo, DeepSpeed); rarely that aborted a finished rank ("terminate called without an active
  exception", SIGABRT), which SLURM counts as a failed task. :func:`exit_now` flushes and leaves
  with ``os._exit``: no destructor runs, so a finished run exits with its own status.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def launched_by_torch_elastic() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def die_with_launcher() -> bool:
    """SIGKILL this process when its parent exits (Linux); True when armed."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the parent died before the request: the kernel will not tell us
        os._exit(128 + signal.SIGKILL)
    return True


def exit_now(code: int) -> None:
    """Flush and end the process with ``code`` without running native destructors."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)
