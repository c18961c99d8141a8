"""An ordered map over worker processes that never reads far ahead of its consumer.

``concurrent.futures.Executor.map`` and ``multiprocessing.Pool.imap`` both take their whole input
before the first result comes back (Python < 3.14), which for a stream of corpus chunks means the
whole corpus in memory. :func:`ordered_map` submits to a ``ProcessPoolExecutor`` and keeps at most
``window`` items in flight, so memory stays bounded whatever the length of the stream.

Workers are started with ``spawn``, so each imports the main script anew: keep heavy imports (torch)
out of a script's top level if it tokenizes with workers. Why ``spawn``: a forked child of a process whose Rust thread pool (Hugging Face
``tokenizers``) or OpenMP threads (torch) have run can deadlock on locks those threads held. And they
end when their parent does, however it ends: a worker of a killed ``ProcessPoolExecutor`` would wait
for work forever (it holds both ends of its own queue's pipe, so it never sees the parent go).

A worker that dies (the kernel kills the largest process when memory runs out) is
:class:`WorkerDied`, naming the items in flight and how the worker ended, never a bare
``BrokenProcessPool``.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, TypeVar

from nexttoken.errors import UserError

Item = TypeVar("Item")
Result = TypeVar("Result")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine_memory() -> int | None:
    """Bytes of memory this process's machine has: the physical memory, or a container's (cgroup)
    limit where that is lower; None where neither can be read."""
    total = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        pass
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit():
            total = min(total, int(limit)) if total else int(limit)
    return total


def memory_words(size: int | None = None) -> str:
    """``"the machine has 24 GiB"`` (of :func:`machine_memory` unless ``size`` is given)."""
    size = machine_memory() if size is None else size
    return "the machine's memory is unknown" if not size else f"the machine has {size / 2**30:.0f} GiB"


class WorkerDied(UserError):
    """A worker process ended while items were in flight (killed by the kernel when memory runs out,
    most often). ``items``: those in flight, oldest first (one of them was being computed by the
    worker that died); ``how``: how it ended, as words (may be empty)."""

    def __init__(self, items: Sequence[Any], how: str) -> None:
        self.items = list(items)
        self.how = how
        super().__init__(
            f"a worker process died{': ' + how if how else ''}; {memory_words()}; use fewer workers, or "
            "free memory"
        )


def ordered_map(
    fn: Callable[[Item], Result],
    items: Iterable[Item],
    workers: int,
    *,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple = (),
    window: int | None = None,
) -> Iterator[Result]:
    """``fn(item)`` for each item, in order, computed by ``workers`` processes (0: in this process,
    where ``initializer`` is not called). ``fn``, ``initializer`` and the items must pickle.

    At most ``window`` items (default ``2 * workers``) are submitted and not yet handed back, so
    the input is read only as fast as results are consumed. An error in a worker is raised here; a
    worker that dies is :class:`WorkerDied`. Closing the iterator early cancels what is queued.
    """
    if workers < 0:
        raise ValueError(f"workers must be 0 or more, got {workers}")
    if workers == 0:
        yield from map(fn, items)
        return
    window = window or 2 * workers
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start_worker, initargs=(initializer, initargs)
    ) as pool:
        pending: deque[tuple[Item, Future]] = deque()

        def oldest() -> Result:
            try:
                return pending[0][1].result()
            except BrokenProcessPool as broken:
                if "initializer" in str(broken):  # not a death: the worker's setup raised (and logged it)
                    raise
                raise WorkerDied([item for item, _ in pending], _how_workers_ended(pool)) from broken
            finally:
                pending.popleft()

        try:
            for item in items:
                try:
                    future = pool.submit(fn, item)
                except BrokenProcessPool:  # a worker died since the last result: report it by its items
                    future = Future()
                    future.set_exception(BrokenProcessPool("a worker died"))
                pending.append((item, future))
                if len(pending) >= window:
                    yield oldest()
            while pending:
                yield oldest()
        finally:
            for _, future in pending:
                future.cancel()


def _how_workers_ended(pool: ProcessPoolExecutor) -> str:
    """How the pool's dead worker ended, in words (``"killed by SIGKILL, ..."``, ``"exited with status
    3"``; "" when that cannot be told). The pool stops the others with SIGTERM once one has died;
    those are not it."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # private, so read with care
    deadline = time.monotonic() + 5.0  # the pool is stopping the others: wait to see who ended how
    while any(getattr(p, "exitcode", 0) is None for p in processes) and time.monotonic() < deadline:
        time.sleep(0.02)
    codes = [getattr(process, "exitcode", None) for process in processes]
    for code in codes:
        if code is not None and code < 0 and -code != signal.SIGTERM:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
            if -code == signal.SIGKILL:
                return "killed by SIGKILL, as the kernel does when memory runs out"
            return f"killed by {name}"
        if code is not None and code > 0:
            return f"exited with status {code}"
    return ""


def _start_worker(initializer: Callable[..., Any] | None, initargs: tuple) -> None:
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


def _exit_with_parent() -> None:
    parent = multiprocessing.parent_process()
    if parent is not None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)
