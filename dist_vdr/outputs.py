"""The output guard every command that writes goes through (:class:`Output`).

What it guarantees, for each command alike (docs/usage.md#outputs has the table per command):

- **Apart from the inputs.** The output never equals, lies inside, or contains an input (a dataset, a
  split, a queries/qrels file, a model, an adapter, a checkpoint): the write would replace or alter
  what it reads. Every local input path is checked to exist, before any work starts.
- **Nothing of the user's replaced.** The output is new, an empty folder, or an earlier output of the
  same command (it carries :data:`MARKER`, or the command's older marker file): a user's folder is
  never replaced, a file is never taken for a folder.
- **Whole or not at all.** The work is written into a hidden scratch folder beside the output (same file
  system: the rename is atomic) and renamed into place at the end; an earlier output is replaced only
  then. On any error or signal the scratch folder is removed (a resumable command keeps it, hidden, for
  the rerun) and the output stays as it was.
- **One line for what the user can fix.** A full disk, a read-only or unwritable folder, and SIGINT /
  SIGTERM end the command with one ``error:`` line naming the output's folder and device, exit 2 (130
  for a signal): :func:`explain` and :func:`interrupted_message`, used by ``dist_vdr.cli.commands``.

The training run folder is resumable and its pieces are atomic each (checkpoints are marked, records are
renamed into place): ``train`` uses the checks and the one-line errors, not the scratch folder.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

MARKER = ".dist-vdr-output.json"
"""Inside every folder a guarded command wrote: the command, its inputs, when."""

_UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
_ACTIVE: list[Output] = []  # the outputs this process checked: what a late error names


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived while a command ran (a BaseException, as KeyboardInterrupt: no ``except
    Exception`` of a library swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_on_signals() -> None:
    """SIGTERM (and SIGINT) raise :class:`Interrupted` in the main thread, so a command stops through its
    ``finally`` blocks: scratch removed, output untouched. Commands with their own signal handling (train's
    preemption, pages build's workers) install theirs over it."""

    def handler(signum, _frame):
        raise Interrupted(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread: the default stays
            signal.signal(signum, handler)


def is_local(path: str) -> bool:
    """Whether ``path`` names a local file or folder rather than a hub id (``org/name``)."""
    p = Path(os.path.expanduser(path))
    return (p.exists() or path.startswith(("/", "./", "../", "~")) or path in (".", "..")
            or (p.parent != Path(".") and p.parent.exists()))


@dataclass
class Output:
    """The folder a command writes (``flag``: how the user gave it), checked against its ``inputs``.

    ``inputs``: option -> path (or a list of paths); None and hub ids are skipped. ``earlier``: marker files
    that identify this command's outputs written before :data:`MARKER` existed. ``replace_any``: the user
    asked to replace whatever folder is there (``--overwrite``), inputs still excepted.
    """

    command: str
    flag: str
    path: Path
    inputs: dict[str, object] = field(default_factory=dict)
    earlier: tuple[str, ...] = ()
    replace_any: bool = False
    resumable: bool = False
    """A killed run keeps its scratch folder (hidden) and the rerun goes on from it (pages build)."""

    def __post_init__(self):
        # Absolute, symlinks kept: `--output .` is the folder it names, with a name and a parent to write beside.
        self.path = Path(os.path.abspath(os.path.expanduser(str(self.path))))

    # ------------------------------------------------------------------ checks, before any work
    def check(self, register: bool = True) -> Output:
        """ValueError (one line, the fix) unless the command may write :attr:`path`; registers it as the
        folder a late write error names (``register``)."""
        if register:
            _ACTIVE.append(self)
        out = self.path
        if out.is_symlink():
            raise ValueError(f"{self.flag} {out} is a symbolic link: give the folder it points to "
                             f"({out.resolve()}) or a new path")
        target = out.resolve()
        for flag, path in self._input_paths():
            if not Path(path).exists():
                raise ValueError(f"{flag} {path} does not exist: check the path")
            how = _overlap(target, Path(path).resolve())
            if how is None:
                continue
            raise ValueError(f"{self.flag} {out} {how} the input {flag} {path}: the command would write over what it "
                             f"reads; choose an output folder apart from every input")
        self.refuse_file()
        self._refuse_inside_another_output(target)
        if out.is_dir() and any(out.iterdir()) and not self.replace_any and not self.is_earlier_output(out):
            other = _marker_command(out)
            what = f"the output of `{other}`" if other else f"a folder that is not an output of `{self.command}`"
            raise ValueError(f"{self.flag} {out} is {what}: it would be replaced; choose a new or empty folder, or "
                             f"delete it if it is yours to lose")
        self.check_writable()
        return self

    def _refuse_inside_another_output(self, target: Path) -> None:
        """An output inside another command's output (or its unfinished scratch folder) would be replaced, moved
        or deleted with it; a work folder that holds outputs by design (a bench's) says so in its marker."""
        if self.is_earlier_output(target):
            return  # written there before, by this command (a bench's own run folders)
        for folder in target.parents:
            try:
                record = json.loads((folder / MARKER).read_text())
            except (OSError, ValueError):
                continue
            if not record.get("holds_outputs"):
                raise ValueError(f"{self.flag} {self.path} lies inside {folder}, an output of `{record.get('command')}`"
                                 f" (or its unfinished scratch folder), which is replaced whole: choose a folder apart")

    def check_apart(self, flag: str, path: str | os.PathLike | None) -> None:
        """ValueError when ``path`` (e.g. ``--cache``) is, holds or lies inside this output: the output is
        replaced whole at the end, and what lies inside with it."""
        if not path:
            return
        if _overlap(self.path.resolve(), Path(os.path.abspath(os.path.expanduser(str(path)))).resolve()):
            raise ValueError(f"{flag} {path} overlaps {self.flag} {self.path}: the output is replaced whole when the "
                             f"command ends; give {flag} a folder apart")

    def refuse_file(self) -> Output:
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"{self.flag} {self.path} is a file: give a folder (new, empty, or an earlier output of "
                             f"`{self.command}`)")
        return self

    def check_writable(self) -> None:
        """ValueError before any work when the output's folder cannot be written (a read-only mount, no
        permission): said now, not after an hour of encoding."""
        near = _existing(self.path if self.path.exists() else self.path.parent)
        if not os.access(near, os.W_OK):
            why = "a read-only file system" if _read_only(near) else "a folder you cannot write to"
            raise ValueError(f"{self.flag} {self.path}: {near} is on {why}: choose an output folder you can write "
                             f"to, or make it writable (nothing was written)")

    def claim(self) -> Output:
        """Register the output without the checks (a command that writes named files into a folder it also
        reads, as ``report``): a late write error names it."""
        _ACTIVE.append(self)
        return self

    def _input_paths(self) -> Iterator[tuple[str, str]]:
        for flag, value in self.inputs.items():
            values = value if isinstance(value, (list, tuple)) else [value]
            for v in values:
                if v is not None and str(v) and is_local(str(v)):
                    yield flag, os.path.expanduser(str(v))

    def is_earlier_output(self, folder: Path) -> bool:
        try:
            if json.loads((folder / MARKER).read_text()).get("command") == self.command:
                return True
        except (OSError, ValueError, AttributeError):
            pass
        return any(any(folder.glob(name)) if "*" in name else (folder / name).exists() for name in self.earlier)

    # ------------------------------------------------------------------ the write
    @contextlib.contextmanager
    def writing(self, record: dict | None = None) -> Iterator[Path]:
        """A scratch folder beside the output to write the whole output into; renamed into place when the
        block ends, removed on any error or signal (kept for the rerun when :attr:`resumable`)."""
        scratch = self.scratch_folder()
        try:
            _write_marker(scratch, self.command, {**self._record_inputs(), **(record or {})})
            yield scratch
            _hold(scratch)
            self._put_in_place(scratch)
        except BaseException:
            if not self.resumable:
                shutil.rmtree(scratch, ignore_errors=True)
            raise

    def scratch_folder(self) -> Path:
        out = self.path
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            if self.resumable:  # a fixed name: the rerun finds it (its marker says whose it is)
                folder = out.parent / f".{out.name}.{self.command.replace(' ', '-')}-partial"
                ours = folder.is_dir() and (self.is_earlier_output(folder) or
                                            all(p.name.startswith(MARKER) for p in folder.iterdir()))  # cut short
                if folder.exists() and not ours:
                    raise ValueError(f"{folder} exists and is not a partial output of `{self.command}`: move it away")
                folder.mkdir(exist_ok=True)
            else:  # a new name: never a user's folder
                folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.{self.command.replace(' ', '-')}-", dir=out.parent))
        except OSError as exc:
            message = explain(exc)
            raise ValueError(message or f"cannot write beside {out} ({exc.strerror or exc})") from None
        umask = os.umask(0)
        os.umask(umask)
        folder.chmod(0o777 & ~umask)  # mkdtemp's 0700 would stay on the renamed folder
        return folder

    def _put_in_place(self, scratch: Path) -> None:
        out = self.path
        old = None
        if out.exists():
            if any(out.iterdir()):  # an earlier output (checked): set aside, then removed
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
                os.replace(out, old / "old")
            else:
                out.rmdir()
        os.replace(scratch, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _record_inputs(self) -> dict:
        return {"inputs": {flag: str(Path(p).resolve()) for flag, p in self._input_paths()}}


def _overlap(target: Path, other: Path) -> str | None:
    """How the resolved folder ``target`` stands to ``other``: it "is", "lies inside" or "contains" it; None: apart."""
    if target == other:
        return "is"
    if other in target.parents:
        return "lies inside"
    if target in other.parents:
        return "contains"
    return None


def _marker_command(folder: Path) -> str | None:
    try:
        return json.loads((folder / MARKER).read_text()).get("command")
    except (OSError, ValueError, AttributeError):
        return None


def _write_marker(folder: Path, command: str, record: dict) -> None:
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    payload = {"command": command, "written": now, **record}
    tmp = folder / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, folder / MARKER)


def mark(folder: str | os.PathLike, command: str, record: dict | None = None) -> None:
    """Mark ``folder`` as an output of ``command`` (a folder written in place, e.g. a training run)."""
    _write_marker(Path(folder), command, record or {})


# ---------------------------------------------------------------------------------------------- files
@contextlib.contextmanager
def replacing_file(path: str | os.PathLike) -> Iterator[Path]:
    """A scratch file beside ``path`` to write; renamed over ``path`` when the block ends, removed on error."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        yield tmp
        _hold(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


HOLD_ENV = "DIST_VDR_HOLD_BEFORE_RENAME_S"
"""Tests: seconds to wait with the whole output written in its scratch, just before the rename (a signal sent
then lands at the moment a half-finished output would be left, were the guard wrong)."""


def _hold(scratch: Path) -> None:
    seconds = float(os.environ.get(HOLD_ENV) or 0)
    if seconds > 0:
        import time

        (scratch.parent / f"{scratch.name}.held").touch()  # the test's cue
        try:
            time.sleep(seconds)
        finally:
            with contextlib.suppress(OSError):
                (scratch.parent / f"{scratch.name}.held").unlink()


# ---------------------------------------------------------------------------------------------- errors
def _existing(folder: Path) -> Path:
    folder = Path(os.path.abspath(folder))
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    return folder


def active() -> Output | None:
    return _ACTIVE[-1] if _ACTIVE else None


def explain(exc: BaseException, where: str | os.PathLike | None = None) -> str | None:
    """The one-line error for a write that failed on a full disk or an unwritable folder -- naming the
    output's folder (the active :class:`Output`, else ``where``, else the working folder) -- or None."""
    from dist_vdr.storage import no_space_message

    output = active()
    folder = Path(where) if where is not None else (output.path if output else Path.cwd())
    failed = getattr(exc, "filename", None)
    near = _existing(Path(failed) if failed else folder)
    code = getattr(exc, "errno", None)
    # Writers wrap the OS error (torch.save: "unexpected pos", safetensors: "IoError(Os { code: 30 ...")
    writing = isinstance(exc, OSError) or any(w in str(exc) for w in ("write", "Write", "pos ", "IoError", "serializ"))
    if code in _UNWRITABLE or (writing and not os.access(near, os.W_OK)):
        why = "a read-only file system" if code == errno.EROFS or _read_only(near) else "a folder you cannot write to"
        return (f"cannot write {folder}: {near} is on {why} ({_strerror(exc)}): choose an output folder you can "
                f"write to, or make it writable, then rerun (nothing was written there)")
    return no_space_message(near, exc)


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _strerror(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
    return str(text)[:160]


def interrupted_message(signum: int) -> str:
    output = active()
    where = (f"{output.path} was left as it was" + (" (the finished part is kept hidden beside it: rerun the same "
                                                    "command to go on)" if output.resumable else ""))\
        if output else "nothing half-written was left"
    return f"interrupted by {signal.Signals(signum).name}: {where}; rerun the same command"
