import torch

from nexttoken.threads import fastest_num_threads


def test_fastest_num_threads_picks_the_quickest_and_sets_it():
    original = torch.get_num_threads()
    try:

        def step():  # pretend one thread is slow: sleep longer under 1 thread
            import time

            time.sleep(0.02 if torch.get_num_threads() == 1 else 0.001)

        best, medians = fastest_num_threads(step, candidates=[1, 2], repeats=2)
        assert best == 2 and torch.get_num_threads() == 2
        assert medians[1] > medians[2]
    finally:
        torch.set_num_threads(original)
