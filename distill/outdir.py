"""One run at a time per output directory: an exclusive ``flock`` on ``<out>/.lock``, held for the run.

Two runs writing into the same ``--out`` would mix their logs and checkpoints; the second one is
refused with the first one's pid. The lock goes with the process (a killed run leaves no stale
lock). Under torchrun only rank 0 takes it: the other ranks of the same run write nothing there.
Every command that writes into an output directory (run, study, train, train-teacher) takes it.
Once the lock is held, temp files left by an interrupted run are removed.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from distill.checkpoint import remove_stale_temp_files
from distill.errors import DistillError

LOCK_NAME = ".lock"


@contextmanager
def locked_out_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Create ``out``, hold its lock for the ``with`` block, clean up stale temp files in it."""
    out = Path(out)
    if int(os.environ.get("RANK", "0")) != 0:
        yield out
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        f = open(out / LOCK_NAME, "a+", encoding="utf-8")
    except OSError as err:
        raise DistillError(f"cannot write to output directory {out}: {err.strerror} (choose another with --out)") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise DistillError(
                f"output directory {out} is in use by another distill run (pid {holder}); "
                "wait for it to finish or choose another --out"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        for directory in (out, out / "cache", *sorted(out.glob("study/**/"))):  # every folder distill writes in
            remove_stale_temp_files(directory)
        try:
            yield out
        finally:
            f.seek(0)
            f.truncate()  # the pid of a finished run would mislead the next refusal
            fcntl.flock(f, fcntl.LOCK_UN)
