import pytest

from nexttoken.commands import eval as eval_command
from nexttoken.errors import UserError
from nexttoken.scoring.windows import Window, check_window_settings, make_windows


def test_windows_worked_example():
    # 10 tokens -> targets 1..9; context 4, stride 2
    assert make_windows(10, 4, 2) == [
        Window(0, 0, 4, 4),  # inputs x0..x3, scores x1..x4
        Window(0, 2, 6, 2),  # inputs x2..x5, scores x5, x6
        Window(0, 4, 8, 2),
        Window(0, 5, 9, 1),  # the last window keeps a full context and scores what is left
    ]
    assert make_windows(1, 4, 2) == [] and make_windows(0, 4, 2) == []
    assert make_windows(3, 4, 4) == [Window(0, 0, 2, 2)]


@pytest.mark.parametrize("n_tokens", [2, 3, 7, 8, 9, 16, 17, 50, 101])
@pytest.mark.parametrize("context, stride", [(1, 1), (4, 1), (4, 3), (4, 4), (8, 3), (16, 8)])
def test_every_target_scored_once_with_enough_context(n_tokens, context, stride):
    seen = []
    for w in make_windows(n_tokens, context, stride):
        assert 1 <= w.length <= context and 1 <= w.n_scored <= w.length
        for t in range(w.end - w.n_scored + 1, w.end + 1):  # target positions scored by w
            seen.append(t)
            left = t - w.begin  # tokens x[begin : t] condition the prediction of x[t]
            assert left >= min(t, context - stride + 1)
    assert sorted(seen) == list(range(1, n_tokens)), "each target exactly once"


@pytest.mark.parametrize(
    "context, stride, max_context, message",
    [
        (8, 9, None, "--stride 9 is larger than --context 8"),
        (8, 0, None, "--stride must be a positive"),
        (0, 1, None, "--context must be a positive"),
        (128, 64, 64, "above the model's maximum context of 64"),
    ],
)
def test_bad_window_settings(context, stride, max_context, message):
    """The message names the settings; ``nexttoken eval`` spells them as its flags."""
    with pytest.raises(UserError) as error:
        check_window_settings(context, stride, max_context)
    assert message in error.value.message(eval_command.spell)
    assert message.replace("--", "") in str(error.value)
