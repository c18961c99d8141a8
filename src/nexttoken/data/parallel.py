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
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
    the input is read only as fast as results are consumed. An error in a worker is raised here;
    closing the iterator early cancels what is queued.
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
        pending: deque[Future] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _start_worker(initializer: Callable[..., Any] | None, initargs: tuple) -> None:
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


def _exit_with_parent() -> None:
    parent = multiprocessing.parent_process()
    if parent is not None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)
