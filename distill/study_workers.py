"""The worker processes of ``distill study --jobs N``: their set-up (one thread, one-line warnings,
the study's stop event and a watch on the study process), and how the study gathers their results
and stops them: a failed training or an interrupt of the study interrupts the running workers and
starts no queued training; a study that dies takes its workers with it."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import Future, as_completed
from multiprocessing import active_children
from multiprocessing.synchronize import Event as EventType
from typing import Any, Callable

import torch

from distill.console import one_line_warnings

WORKER: dict[str, Any] = {}  # in a worker process: "stop" (the study's Event), "data", the "teacher" read last and its "teacher_out"


def worker_init(stop: EventType, parent: int) -> None:
    """A worker's set-up: one thread, one-line warnings, the study's stop event, and the watch on
    ``parent``, the study's pid as the study gave it (``os.getppid()`` here would already be init's
    when the study died while this worker was still starting)."""
    torch.set_num_threads(1)
    one_line_warnings()
    WORKER["stop"] = stop
    # idle, an interrupt has nothing to stop, and one that lands in the pool's own queue code can
    # leave the pool unable to shut down: only a running training (unless_stopped) is interruptible
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=stop_with_parent, args=(parent,), daemon=True).start()


def gather(futures: dict[Future, tuple], store: Callable[..., None], stop: EventType) -> None:
    """``store(*futures[f], *f.result())`` for each training as it finishes. On a failed training or an
    interrupt of this process alone (``kill -INT``): ``stop`` is set, so that no worker starts another
    training (the pool hands each worker its next task early, beyond ``cancel``'s reach), and the
    running ones are interrupted as Ctrl-C would (checkpoints stay resumable), instead of the pool
    waiting for them, up to an hour, only to discard their results."""
    try:
        for future in as_completed(futures):
            store(*futures[future], *future.result())
    except BaseException:
        stop.set()
        for future in futures:
            future.cancel()
        for worker in active_children():
            os.kill(worker.pid, signal.SIGINT)
        raise


def unless_stopped(fn: Callable[..., Any], *args: Any) -> Any:
    """In a worker: ``fn(*args)``, interruptible by SIGINT, unless the study has stopped (:func:`gather`
    sets ``stop`` before it interrupts, so an interrupt ignored while idle is seen here)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if WORKER["stop"].is_set():
            raise KeyboardInterrupt("the study stopped before this training started")
        return fn(*args)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def stop_with_parent(parent: int, every_s: float = 2.0, grace_s: float = 10.0) -> None:
    """Interrupt this process (SIGINT: its training unwinds as under Ctrl-C, nothing half-written)
    once ``parent``, the study that started it, is gone, and end it ``grace_s`` later (a pool worker
    that reported the interruption waits for its next task forever): a study killed alone (``kill``,
    a job scheduler's SIGTERM, SIGKILL) would otherwise leave its workers training for up to an hour."""
    while os.getppid() == parent:
        time.sleep(every_s)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(grace_s)
    os._exit(1)
