"""Running the tasks of a `dist-vdr pages build` in worker processes, interruptibly: SIGINT/SIGTERM
handling, the process pool, and isolating a file that crashes its renderer process."""

from __future__ import annotations

import json
import shutil
import signal
import threading
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from dist_vdr.data.ingest_config import BuildInterrupted, PagesBuildConfig
from dist_vdr.data.ingest_render import _init_worker


def _remove_leftovers(out: Path) -> None:
    """Half-written shards and status notes of workers that were killed (none run now)."""
    for path in (out / "shards").glob(".tmp-*"):
        shutil.rmtree(path, ignore_errors=True)
    for path in (out / "shards").glob(".rendering-*"):
        path.unlink()


class _StopSignals:
    """SIGINT/SIGTERM during a build: noted, and acted on at the next safe point (``check``), so
    finished shards are recorded before the build exits; with ``immediate``, or at a second signal
    (a user who does not want to wait), acted on at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.immediate = False
        self._previous: dict = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        again = self.signum is not None
        self.signum = signum
        if self.immediate or again:
            self.check()

    def check(self) -> None:
        if self.signum is not None:
            raise BuildInterrupted(self.signum)


class _Workers:
    """A process pool kept across the build's phases; replaced after a worker dies."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._pool: ProcessPoolExecutor | None = None

    def pool(self) -> ProcessPoolExecutor:
        import multiprocessing

        if self._pool is None:
            # Always processes, even for one worker: a file that crashes native code must not take
            # the build (and its manifest) down. spawn: PDFium and the parent's threads are not
            # forked half-set.
            self._pool = ProcessPoolExecutor(self.size, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker)
        return self._pool

    def close(self, kill: bool = False) -> None:
        """Shut the pool down; with ``kill``, end the workers now instead of after their tasks."""
        if self._pool is None:
            return
        if kill:
            # ProcessPoolExecutor has no public way to end running tasks before Python 3.14.
            for process in list((self._pool._processes or {}).values()):
                process.kill()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None


def _map(workers: _Workers, fn, cfg: PagesBuildConfig, tasks: list, on_result, stop: _StopSignals) -> None:
    """``on_result(i, fn(cfg, tasks[i]))`` for every task as it finishes.

    On a signal or a dead worker the pool is ended, and results that came back before it are still
    passed on (their shards are on disk), then the exception goes on.
    """
    pool = workers.pool()
    # submit() starts the worker processes. They are born with SIGINT blocked (the mask is inherited
    # through fork and exec): a Ctrl-C to the process group must not kill one still importing, nor
    # make one drop its task; the parent gets it (pending until unblocked here) and ends them.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        futures = {pool.submit(fn, cfg, task): i for i, task in enumerate(tasks)}
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    consumed = set()

    def consume(future) -> None:
        consumed.add(future)
        on_result(futures[future], future.result())

    try:
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)  # a timeout: check() runs
            for future in sorted(done, key=futures.get):
                consume(future)
            stop.check()
    except BaseException:
        workers.close(kill=True)  # after this every future is settled
        for future in futures:
            if future not in consumed and future.done() and not future.cancelled() and future.exception() is None:
                consume(future)
        raise


def _item_file(item) -> str:
    return item if isinstance(item, str) else item[0]


def _run_isolated(workers: _Workers, fn, cfg: PagesBuildConfig, tasks: list, on_result, on_crash,
                  stop: _StopSignals, write) -> None:
    """Run every task; a file that crashes its process is found and given to ``on_crash``.

    When a worker dies, the pool is broken and the items its processes were on are unknown among
    the in-flight ones: each worker notes its current item, those items are retried one per
    process (the one that crashes again is bad, with the rest of its file), and the other tasks go
    on in a fresh pool.
    """
    status_dir = Path(cfg.out_dir) / "shards"
    while tasks:
        _remove_leftovers(Path(cfg.out_dir))  # notes of an earlier pool must not name suspects
        finished: set[int] = set()

        def take(i, result, finished=finished) -> None:  # this round's set (called within the round)
            finished.add(i)
            on_result(result)

        try:
            _map(workers, fn, cfg, tasks, take, stop)
            return
        except BrokenProcessPool:
            stop.check()  # workers ended by a signal to the process group did not crash
            suspects = [json.loads(t) for t in {f.read_text() for f in status_dir.glob(".rendering-*")} - {""}]
            if not suspects:
                raise
            _remove_leftovers(Path(cfg.out_dir))  # the notes are read; the dead worker's half shard goes
            write(f"a renderer process crashed on one of {sorted(map(_item_file, suspects))}: "
                  "retrying those one per process")
            crashed = set()
            for item in suspects:
                alone = _Workers(1)
                try:
                    _map(alone, fn, cfg, [[item]], lambda i, result: on_result(result), stop)
                except BrokenProcessPool:
                    stop.check()
                    crashed.add(_item_file(item))
                    on_crash(item)
                finally:
                    alone.close()
            suspect_keys = {json.dumps(item) for item in suspects}
            tasks = [[item for item in task if json.dumps(item) not in suspect_keys and _item_file(item) not in crashed]
                     for i, task in enumerate(tasks) if i not in finished]
            tasks = [task for task in tasks if task]
