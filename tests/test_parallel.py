import pytest

from nexttoken.data.parallel import ordered_map


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
