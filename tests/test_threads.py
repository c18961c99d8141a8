import lightning as L
import torch
from torch.utils.data import DataLoader

from nexttoken.training.module import CausalLMModule
from nexttoken.training.threads import fastest_num_threads


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


class FakeTrainer:
    def __init__(self):
        self.global_step = 0


def run_steps(monkeypatch, seconds_per_step: dict[int, float], steps: int, validate_after: tuple = ()):
    """Drive AutoThreads (re-probe after 45 ms, 3 probed steps) over ``steps`` fake steps that take
    ``seconds_per_step[threads]`` on a fake clock, from 2 threads; returns the thread count after each
    step and the callback."""
    import nexttoken.training.threads as threads

    now = [0.0]
    monkeypatch.setattr(threads.time, "perf_counter", lambda: now[0])
    original = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        callback = threads.AutoThreads(reprobe_seconds=0.045, probe_steps=3)
        callback.candidates, callback._first = [1, 2], False
        trainer, history = FakeTrainer(), []
        for _ in range(steps):
            callback.on_train_batch_start(trainer, None, None, 0)
            now[0] += seconds_per_step[torch.get_num_threads()]
            trainer.global_step += 1
            callback.on_train_batch_end(trainer, None, None, None, 0)
            history.append(torch.get_num_threads())
            if trainer.global_step in validate_after:
                callback.on_validation_start(trainer, None)
        return history, callback
    finally:
        torch.set_num_threads(original)


def test_validation_during_a_probe_ends_it_with_the_count_from_before(monkeypatch):
    # The probe of 1 thread starts after step 5; validation comes after step 6, before it decides.
    history, callback = run_steps(monkeypatch, {2: 0.010, 1: 0.004}, 10, validate_after=(6,))
    assert history[:6] == [2] * 4 + [1, 1]
    assert history[6:] == [2] * 4  # back to 2 threads; the next probe waits another 45 ms
    assert callback._probing is None and callback.switches == []


def test_auto_threads_reprobe_keeps_the_faster_count(monkeypatch):
    # A busy machine: a step takes 10 ms with 2 threads and 4 ms with 1.
    history, callback = run_steps(monkeypatch, {2: 0.010, 1: 0.004}, 26)
    assert history[:5] == [2] * 4 + [1]  # 45 ms in (step 5) it tries 1 thread...
    # ...keeps it; 45 ms later (step 21) it tries 2 threads again: slower, back to 1.
    assert history[9:] == [1] * 11 + [2, 2] + [1] * 4
    assert callback.switches == [(9, 1)]


def test_auto_threads_drops_a_clearly_slower_probe_at_once(monkeypatch):
    history, callback = run_steps(monkeypatch, {2: 0.010, 1: 0.050}, 8)
    assert history == [2, 2, 2, 2, 1, 1, 2, 2]  # two probed steps (the first settles), then back
    assert callback.switches == []


class RngAndGrads(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.seen.append((torch.get_rng_state(), len(grads)))


def _fit(callbacks, steps=3):
    torch.manual_seed(0)
    module = CausalLMModule(
        model="tiny", vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.1
    )
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 32, (2, 8), generator=g), torch.randint(0, 32, (2, 8), generator=g))] * steps
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    trainer.fit(module, DataLoader(data, batch_size=None))
    return module


def test_auto_threads_probes_the_first_batch_without_touching_the_run(monkeypatch, capsys):
    from nexttoken.training import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    original = torch.get_num_threads()
    try:
        before, after = RngAndGrads(), RngAndGrads()
        auto = threads.AutoThreads(reprobe_seconds=0)
        _fit([before, auto, after])
        assert torch.equal(before.seen[0][0], after.seen[0][0])  # the probe left the RNG as it was
        assert after.seen[0][1] == 0  # and no gradients behind
        assert auto.choice.split()[0] in ("1", "2") and auto.switches[0][1] == torch.get_num_threads()
        assert f"threads: {auto.choice}" in capsys.readouterr().out
    finally:
        torch.set_num_threads(original)


def test_auto_threads_respects_omp_num_threads(monkeypatch):
    from nexttoken.training import threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    calls = []
    monkeypatch.setattr(threads, "fastest_num_threads", lambda *a, **k: calls.append(1))
    auto = threads.AutoThreads()
    _fit([auto])
    assert calls == [] and auto.choice.endswith("(OMP_NUM_THREADS=1)")


def test_auto_threads_takes_timings_just_made_instead_of_probing_again(monkeypatch, capsys):
    from nexttoken.training import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    probes = []
    monkeypatch.setattr(threads, "fastest_num_threads", lambda *a, **k: probes.append(1))
    original = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        auto = threads.AutoThreads(reprobe_seconds=0)
        auto.use_timings({1: 0.004, 2: 0.009}, "a validation batch's forward")
        _fit([auto])
        assert probes == [] and torch.get_num_threads() == 1 and auto.switches == [(0, 1)]
        assert (
            auto.choice
            == "1 (auto: a validation batch's forward 1: 4 ms, 2: 9 ms; OMP_NUM_THREADS=N fixes it)"
        )
        assert f"threads: {auto.choice}" in capsys.readouterr().out
        # Timings of other counts than it chooses from decide nothing: it probes.
        auto = threads.AutoThreads(reprobe_seconds=0)
        auto.use_timings({1: 0.004, 4: 0.009}, "a validation batch's forward")
        monkeypatch.setattr(
            threads, "fastest_num_threads", lambda *a, **k: probes.append(1) or (2, {1: 0.2, 2: 0.1})
        )
        _fit([auto])
        assert probes == [1] and auto.choice.startswith("2 (auto: forward 1: 200 ms, 2: 100 ms")
    finally:
        torch.set_num_threads(original)
