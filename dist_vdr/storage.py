"""Writing files: whole or not at all (:func:`atomic_write`), and a full disk said in one line: which
folder, how much is free, what to do.

Writers fail on a full disk in many ways: ``OSError(ENOSPC)`` from Python, but torch.save reports
``RuntimeError: [enforce fail at inline_container.cc] unexpected pos ...`` and safetensors its own
error. So a failed write is also called a full disk when the folder's file system has (almost) no
space left after it.
"""

from __future__ import annotations

import errno
import os
import shutil

NEARLY_FULL_BYTES = 64 << 20


def _existing(folder: str) -> str:
    folder = os.path.abspath(folder)
    while folder and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    return folder or os.getcwd()


def no_space_message(folder: str | os.PathLike, exc: BaseException) -> str | None:
    """The one-line explanation when ``exc`` came from a full disk under ``folder``, else None."""
    where = _existing(getattr(exc, "filename", None) and os.path.dirname(str(exc.filename)) or str(folder))
    free = shutil.disk_usage(where).free
    if getattr(exc, "errno", None) != errno.ENOSPC and free >= NEARLY_FULL_BYTES:
        return None
    detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return (f"no space left on the device of {where} ({free / 2**30:.2f} GiB free; the write failed with: "
            f"{detail}): free some space (older runs, set-aside checkpoints) or choose another folder, then rerun "
            f"(finished checkpoints are kept)")


def atomic_write(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (a temporary beside it, then renamed): a reader never
    sees half a file."""
    from pathlib import Path

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
