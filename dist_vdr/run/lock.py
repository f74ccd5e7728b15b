"""One writer per run folder: an exclusive lock file in ``training.output_dir``.

Two launches into one folder (another terminal, a resubmitted job, a forgotten background run)
would both "start a new run" and write the same checkpoints and ``final/``. Rank 0 creates
``.dist_vdr.lock`` with O_EXCL, holding host, pid, process start time, SLURM job id and command,
and refreshes its modification time every :data:`HEARTBEAT_S` seconds from a daemon thread. A
second launch finds the lock held and stops with a one-line error naming the holder.

A lock is stale, and taken over with a log line, when its holder is provably gone: on this host,
its pid no longer runs the process that took it (start time compared, so a reused pid does not
count); an earlier attempt of the same SLURM job (a requeued job's previous attempt has ended); or
no heartbeat for :data:`STALE_S` seconds (a holder on another host that died without cleaning up).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

LOCK_FILE = ".dist_vdr.lock"
HEARTBEAT_S = 30.0
STALE_S = 600.0


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), None elsewhere or when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(holder: dict, age_s: float | None = None) -> str:
    parts = [f"host {holder.get('host')}", f"pid {holder.get('pid')}"]
    if holder.get("slurm_job_id"):
        parts.append(f"SLURM job {holder['slurm_job_id']}")
    if holder.get("started"):
        parts.append(f"started {holder['started']}")
    if age_s is not None:
        parts.append(f"last heartbeat {age_s:.0f} s ago")
    return ", ".join(parts)


def stale_reason(holder: dict, age_s: float, me: dict) -> str | None:
    """Why ``holder`` no longer holds the lock, or None when it may still be running."""
    if holder.get("host") == me["host"]:
        pid = int(holder.get("pid", -1))
        if pid == me["pid"] and holder.get("pid_start") == me["pid_start"]:
            return "this process took it"
        if not _alive(pid):
            return f"its process {pid} has ended"
        start = _start_time(pid)
        if holder.get("pid_start") and start and start != holder.get("pid_start"):
            return f"pid {pid} now belongs to another process"
    if holder.get("slurm_job_id") and holder.get("slurm_job_id") == me.get("slurm_job_id"):
        return "it was taken by an earlier attempt of this SLURM job"
    if age_s > STALE_S:
        return f"no heartbeat for {age_s:.0f} s (> {STALE_S:.0f} s)"
    return None


class RunLock:
    """The lock of one run folder, held by rank 0 for the whole run (``with RunLock(out) as lock``)."""

    def __init__(self, output_dir: str | os.PathLike, log=print) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self.log = log
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.record = {
            "host": socket.gethostname(), "pid": os.getpid(), "pid_start": _start_time(os.getpid()),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_ARRAY_JOB_ID"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:500],
        }

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            self._take_over()
        else:
            with os.fdopen(fd, "w") as f:
                json.dump(self.record, f)
        self._thread = threading.Thread(target=self._beat, name="dist-vdr-lock-heartbeat", daemon=True)
        self._thread.start()

    def _read(self) -> tuple[dict, float]:
        try:
            holder = json.loads(self.path.read_text())
            age = time.time() - self.path.stat().st_mtime
        except (OSError, ValueError):  # half-written or vanished: treat as a holder without a heartbeat
            return {}, STALE_S + 1
        return (holder if isinstance(holder, dict) else {}), age

    def _take_over(self) -> None:
        holder, age = self._read()
        why = stale_reason(holder, age, self.record)
        if why is None:
            raise ValueError(f"{self.path.parent} is in use by another run ({describe(holder, age)}): wait for it "
                             f"to finish or stop it, or choose another training.output_dir")
        tmp = self.path.with_name(f"{LOCK_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.record))
        os.replace(tmp, self.path)
        time.sleep(0.2)  # two launches taking over the same stale lock: the last rename wins, the other sees it
        now = self._read()[0]
        if now.get("pid") != self.record["pid"] or now.get("host") != self.record["host"]:
            raise ValueError(f"{self.path.parent} was just taken by another run ({describe(now)}); "
                             f"choose another training.output_dir")
        self.log(f"took over the lock of {self.path.parent} from {describe(holder)}: {why}")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        holder, _ = self._read()
        if holder.get("pid") == self.record["pid"] and holder.get("host") == self.record["host"]:
            with contextlib.suppress(OSError):
                self.path.unlink()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
