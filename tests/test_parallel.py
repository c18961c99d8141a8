import os
import signal

import pytest

from nexttoken.data.parallel import WorkerDied, machine_memory, memory_words, ordered_map


def kill_this_process(*args) -> None:
    """A job that dies as the kernel's out-of-memory killer ends a process (importable by workers)."""
    os.kill(os.getpid(), signal.SIGKILL)


def die_on_seven(item: str) -> int:
    if item == "7":
        kill_this_process()
    if item == "exit":
        os._exit(3)
    return int(item)


def counting(items, taken: list[int]):
    for item in items:
        taken.append(item)
        yield item


@pytest.mark.parametrize("workers", [0, 2])
def test_results_in_order_and_never_far_ahead_of_the_consumer(workers):
    items = [str(i) for i in range(40)]
    taken: list[str] = []
    results = []
    for result in ordered_map(int, counting(items, taken), workers, window=3):
        results.append(result)
        # Items read from the input but not handed back yet: at most the window.
        assert len(taken) - len(results) <= (3 if workers else 0)
    assert results == list(range(40))


def test_a_worker_error_is_raised_here_and_stops_the_input():
    taken: list[str] = []
    items = [str(i) for i in range(5)] + ["not a number"] + [str(i) for i in range(100)]
    with pytest.raises(ValueError, match="not a number"):
        list(ordered_map(int, counting(items, taken), 2, window=4))
    assert len(taken) <= 6 + 4


def test_bad_worker_count():
    with pytest.raises(ValueError, match="workers must be 0 or more"):
        list(ordered_map(int, ["1"], -1))


def test_a_worker_that_dies_is_worker_died_naming_the_items_in_flight():
    taken: list[str] = []
    results = []
    with pytest.raises(WorkerDied) as died:
        for result in ordered_map(die_on_seven, counting([str(i) for i in range(50)], taken), 2, window=3):
            results.append(result)
    assert results == list(range(len(results))) and len(results) <= 7
    assert "7" in died.value.items and len(died.value.items) <= 3  # only what was in flight
    assert died.value.how == "killed by SIGKILL, as the kernel does when memory runs out"
    assert str(died.value).startswith("a worker process died: killed by SIGKILL")
    assert memory_words() in str(died.value)
    assert len(taken) <= 7 + 3
    with pytest.raises(WorkerDied, match="exited with status 3"):
        list(ordered_map(die_on_seven, ["1", "exit", "2"], 1))


def test_machine_memory_in_words():
    assert memory_words(24 * 2**30) == "the machine has 24 GiB"
    assert memory_words(0) == "the machine's memory is unknown"
    total = machine_memory()
    assert total is None or total > 2**26
