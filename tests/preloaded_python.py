"""A preloaded Python for the tests' launches: one server process imports torch, transformers,
sentence-transformers, accelerate, DeepSpeed and dist_vdr once; every launch the tests make (the
launcher, each rank, a CLI command) forks from it instead of importing them again.

Why: a tiny 2-rank test run spends ~80 % of its wall time importing (docs/benchmarks.md#test-suite):
~7 s per rank and ~3 s for the launcher, against ~0.3 s per training step, and the suite launches a
few hundred processes. What runs is unchanged: accelerate's launcher and torch elastic start every
rank as a process of its own (with its own pid, session, stdio, environment and exit status), through
``stub`` below given to them as the Python executable (``PYTHON`` for launch/train.sh, ``PYTHON_EXEC``
for torch elastic); only the imports were done before the fork.

- ``stub`` (the executable ``python`` of a launch): takes Python's own command line (``[-u] -m MODULE
  ARGS``, ``-c CODE ARGS`` or ``SCRIPT ARGS``), hands its stdin/stdout/stderr, arguments, environment
  and folder to the server, forwards every signal it gets to the forked process and exits as it
  exits (with its status, or killed by its signal). Anything else — another interpreter option, a
  launch under SLURM (its job steps must own their processes), an environment whose import-time
  variables differ from the server's, no server — runs the real interpreter in its place (exec).
- ``serve``: imports, then forks one process per request from a single thread (no lock can be held
  across a fork), reaps them and reports each status. A stub that dies without being told (SIGKILL)
  takes its process with it: the server kills the process of a connection that closed. The pid of
  each stub's process is written under ``<socket>.pids/`` so that tests that SIGKILL a whole launch
  (conftest.kill_tree) find the forked processes too.

Only the tests use this (conftest.launch_env); users' launches are plain interpreters. Tests whose
claim is about the processes themselves (ranks dying with their launcher through the parent-death
signal, SLURM) launch real interpreters.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import sys

SOCKET_ENV = "DIST_VDR_TEST_PRELOAD"
"""The server's socket path; a stub without it runs the real interpreter."""
REAL_PYTHON_ENV = "DIST_VDR_TEST_REAL_PYTHON"
"""The interpreter the stub stands for (exec'd when the server cannot serve a launch)."""

# Variables that modules read while being imported (thread pools, offline mode, hub folders, the
# interpreter's own): a launch that sets them otherwise than the server did cannot use its imports.
# Left out: what is read at run time (dist_vdr's own DIST_VDR_*, accelerate's ACCELERATE_* and torch
# elastic's TORCHELASTIC_* set for each rank, DeepSpeed's accelerator choice, made at first use),
# and PYTHONPATH, which the forked process applies to its sys.path as the interpreter would.
IMPORT_TIME_PREFIXES = ("OMP_", "MKL_", "OPENBLAS_", "KMP_", "HF_", "TRANSFORMERS_", "TORCH_", "PYTORCH_", "CUDA_",
                        "TOKENIZERS_", "DS_", "SENTENCE_TRANSFORMERS_", "ATEN_", "ONEDNN_", "DNNL_")
INTERPRETER = {"PYTHONHASHSEED", "PYTHONWARNINGS", "PYTHONOPTIMIZE", "PYTHONDONTWRITEBYTECODE", "PYTHONIOENCODING",
               "PYTHONUTF8", "PYTHONSAFEPATH", "PYTHONHOME", "PYTHONMALLOC", "PYTHONDEVMODE", "PYTHONNOUSERSITE"}
RUN_TIME = {"DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR"}
RUN_TIME_PREFIXES = ("TORCH_NCCL_", "TORCHELASTIC_")
PRELOAD = ("numpy", "torch", "torch.distributed.run", "transformers", "sentence_transformers", "accelerate",
           "accelerate.commands.launch", "datasets", "peft", "deepspeed", "dist_vdr.cli", "dist_vdr.cli.commands",
           "dist_vdr.cli.launcher", "dist_vdr.run.training")


def _import_time_env(env: dict) -> dict:
    return {k: v for k, v in env.items()
            if (k.startswith(IMPORT_TIME_PREFIXES) or k in INTERPRETER) and k not in RUN_TIME
            and not k.startswith(RUN_TIME_PREFIXES)}


def _send(sock: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    frame = struct.pack("!I", len(data)) + data
    if fds:
        socket.send_fds(sock, [frame], fds)
    else:
        sock.sendall(frame)


def _recv_request(sock: socket.socket) -> tuple[dict | None, list[int]]:
    """The stub's one frame and its three descriptors; (None, fds) when the peer closed early."""
    data, fds, _, _ = socket.recv_fds(sock, 1 << 20, 3)
    fds = list(fds)
    if len(data) < 4:
        return None, fds
    size = struct.unpack("!I", data[:4])[0]
    data = data[4:]
    while len(data) < size:
        more = sock.recv(size - len(data))
        if not more:
            return None, fds
        data += more
    return json.loads(data), fds


def _read_frame(stream) -> dict | None:
    """The next frame from the server (a buffered reader: two frames may arrive in one read)."""
    head = stream.read(4)
    if len(head) < 4:
        return None
    data = stream.read(struct.unpack("!I", head)[0])
    return json.loads(data) if data else None


def _python_command(argv: list[str]) -> list[str] | None:
    """``[mode, target, *args]`` for the command lines the server runs (mode -m, -c or a script path),
    None for any other interpreter option."""
    i = 0
    while i < len(argv) and argv[i] == "-u":
        i += 1
    if i < len(argv) and argv[i] in ("-m", "-c") and i + 1 < len(argv):
        return [argv[i], argv[i + 1], *argv[i + 2:]]
    if i < len(argv) and not argv[i].startswith("-"):
        return ["script", argv[i], *argv[i + 1:]]
    return None


# --- the stub ----------------------------------------------------------------------------------------------

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
             signal.SIGCONT)


class _Forwarder:
    """The stub's signal handler: every signal goes to the forked process; those that come before it exists
    are kept and sent once it does (or, when the real interpreter takes over, raised again in the stub)."""

    def __init__(self):
        self.child: int | None = None
        self.pending: list[int] = []
        for signum in FORWARDED:
            signal.signal(signum, self)

    def __call__(self, signum, frame):
        if self.child is None:
            self.pending.append(signum)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.child, signum)

    def start(self, child: int) -> None:
        self.child = child
        for signum in self.pending:
            self(signum, None)

    def give_up(self) -> None:
        for signum in FORWARDED:
            signal.signal(signum, signal.SIG_DFL)
        for signum in self.pending:
            os.kill(os.getpid(), signum)


def _ask_server(path: str, command: list[str]):
    """(the forked process's pid, the reader of the server's replies), or (None, None)."""
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(path)
        _send(conn, {"command": command, "env": dict(os.environ), "cwd": os.getcwd(), "stub": os.getpid()},
              fds=[0, 1, 2])
        replies = conn.makefile("rb")
        reply = _read_frame(replies)
    except OSError:
        return None, None
    return (reply["pid"], replies) if reply and "pid" in reply else (None, None)


def stub() -> None:
    argv = sys.argv[1:]
    real = os.environ.get(REAL_PYTHON_ENV) or sys.executable
    command = _python_command(argv)
    path = os.environ.get(SOCKET_ENV)
    if command is None or not path or "SLURM_JOB_ID" in os.environ:
        os.execv(real, [real, *argv])
    forwarder = _Forwarder()
    child, replies = _ask_server(path, command)
    if child is None:
        forwarder.give_up()
        os.execv(real, [real, *argv])
    forwarder.start(child)
    try:
        done = _read_frame(replies)
    except OSError:
        done = None
    status = done["status"] if done else 128 + signal.SIGKILL
    if status < 0:  # killed by a signal: end the same way, so that the launcher reports that signal
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    os._exit(status if status >= 0 else 128 - status)


# --- the server --------------------------------------------------------------------------------------------

def _exit_status(wait_status: int) -> int:
    """Exit code, or minus the signal that killed the process."""
    return -os.WTERMSIG(wait_status) if os.WIFSIGNALED(wait_status) else os.WEXITSTATUS(wait_status)


def _become(request: dict, fds: list[int]) -> list[str]:
    """Give the forked process what ``python`` would have: a session of its own (torch elastic gives every
    rank one), default signal handlers, the stub's stdio (as ``python -u`` makes them), folder and
    environment. Returns PYTHONPATH's folders."""
    import io

    os.setsid()
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        raw = io.FileIO(fd, "r" if fd == 0 else "w", closefd=False)
        stream = io.TextIOWrapper(io.BufferedReader(raw) if fd == 0 else raw, encoding="utf-8",
                                  errors="backslashreplace" if fd == 2 else "strict", write_through=fd != 0)
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)
    return [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]


def _run(command: list[str], cwd: str, extra_path: list[str]) -> None:
    """``python -m MODULE``, ``python -c CODE`` or ``python SCRIPT`` with their arguments."""
    import runpy

    mode, target, *args = command
    if mode == "-m":
        sys.argv, sys.path[:1] = [target, *args], [cwd, *extra_path]
        sys.modules.pop(target, None)  # `python -m` runs the module as __main__ only, never imported under its name
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    elif mode == "-c":
        sys.argv, sys.path[:1] = ["-c", *args], [cwd, *extra_path]
        exec(compile(target, "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    else:
        sys.argv, sys.path[:1] = [target, *args], [os.path.dirname(os.path.abspath(target)), *extra_path]
        runpy.run_path(target, run_name="__main__")


def runpy_file() -> str:
    import runpy

    return runpy.__file__


def _exit_code(stop: SystemExit) -> int:
    if stop.code is None or isinstance(stop.code, int):
        return stop.code or 0
    print(stop.code, file=sys.stderr)
    return 1


def _child(request: dict, fds: list[int]) -> None:
    """In the forked process: become what ``python <command>`` would be, run it, exit as it would."""
    import atexit
    import threading
    import traceback

    code = 1
    try:
        _run(request["command"], request["cwd"], _become(request, fds))
        code = 0
    except SystemExit as stop:
        code = _exit_code(stop)
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException as exc:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename in (__file__, runpy_file()):
            tb = tb.tb_next  # the traceback the interpreter would print: from the command's own frames
        traceback.print_exception(type(exc), exc, tb)
    finally:
        try:
            threading._shutdown()  # as the interpreter does at exit: wait for non-daemon threads, then atexit
            atexit._run_exitfuncs()
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
        finally:
            if code < 0:  # an uncaught Ctrl-C ends the interpreter by that signal
                signal.signal(-code, signal.SIG_DFL)
                os.kill(os.getpid(), -code)
            os._exit(code)


def _refusal(request: dict | None, fds: list[int], env: dict) -> str | None:
    """Why the server cannot run a request (the stub then execs the real interpreter), or None."""
    if request is None or len(fds) != 3:
        return "incomplete request"
    differ = sorted(k for k in set(env) | set(_import_time_env(request["env"]))
                    if env.get(k) != request["env"].get(k))
    return f"import-time environment differs: {differ}" if differ else None


class _Server:
    def __init__(self, path: str, env: dict):
        import selectors

        self.path, self.pids_dir = path, path + ".pids"
        os.makedirs(self.pids_dir, exist_ok=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a socket file left by a server that was killed
        self.listener.bind(path)
        self.listener.listen(64)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.selector.register(self.wake_r, selectors.EVENT_READ, "reap")
        self.children: dict[int, tuple[socket.socket, int]] = {}  # pid -> (connection, stub pid)
        self.env = env

    def serve(self) -> None:
        while True:
            for key, _ in self.selector.select():
                if key.data == "accept":
                    self._accept()
                elif key.data == "reap":
                    self._drain_wakeups()
                    self._reap()
                else:
                    self._stub_gone(key.fileobj, key.data)

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _accept(self) -> None:
        import selectors

        conn, _ = self.listener.accept()
        try:
            request, fds = _recv_request(conn)
        except OSError:
            conn.close()
            return
        why = _refusal(request, fds, self.env)
        self._log(f"{'refused' if why else 'served'}\t{' '.join((request or {}).get('command', [])[:2])[:120]}"
                  f"\t{why or ''}")
        if why:
            for fd in fds:
                os.close(fd)
            _send(conn, {"exec": why})
            conn.close()
            return
        pid = os.fork()
        if pid == 0:
            signal.set_wakeup_fd(-1)
            self.selector.close()
            self.listener.close()
            conn.close()
            for other, _ in self.children.values():
                other.close()
            _child(request, fds)
        for fd in fds:
            os.close(fd)
        self.children[pid] = (conn, request["stub"])
        with open(os.path.join(self.pids_dir, str(request["stub"])), "w") as record:
            record.write(str(pid))
        _send(conn, {"pid": pid})
        self.selector.register(conn, selectors.EVENT_READ, pid)

    def _log(self, line: str) -> None:
        """One line a request in ``<socket>.log`` (what the tests' summary counts)."""
        with open(self.path + ".log", "a") as log:
            log.write(line.replace("\n", " ") + "\n")

    def _stub_gone(self, conn: socket.socket, pid: int) -> None:
        """The stub's end closed before its process ended (a stub sends nothing after its request): the
        stub was killed, and so is its process (reaped and reported like any other)."""
        self.selector.unregister(conn)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn, stub_pid = self.children.pop(pid, (None, None))
            if conn is None:
                continue
            if conn.fileno() in self.selector.get_map():
                self.selector.unregister(conn)
            with contextlib.suppress(OSError):
                _send(conn, {"status": _exit_status(status)})
            conn.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.pids_dir, str(stub_pid)))


def serve(path: str) -> None:
    import importlib
    from pathlib import Path

    env = _import_time_env(dict(os.environ))  # before the imports: torch sets KMP_* variables of its own
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - an optional library missing only costs its import later
            print(f"preloaded python: {name} not preloaded ({exc})", file=sys.stderr)
    # Forking copies only the calling thread: any other thread's locks would stay held in the child. The one
    # allowed is jemalloc's background purger (pyarrow's allocator, started when datasets imports it):
    # jemalloc takes all its locks around fork (pthread_atfork) and restarts the thread in the child.
    tasks = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []
    others = [Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in tasks if int(t) != os.getpid()]
    if [name for name in others if name != "jemalloc_bg_thd"]:
        print(f"preloaded python: threads {others} after the imports; forking is unsafe, serving nothing",
              file=sys.stderr)
        return
    server = _Server(path, env)
    print("ready", flush=True)
    server.serve()


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2])
    else:
        stub()
