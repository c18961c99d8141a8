"""The console policy: quiet libraries, one-line warnings, everything with --verbose, nothing left behind."""

import logging
import os
import subprocess
import sys
import warnings
from unittest import mock

import pytest

from nexttoken.console import QUIET_ENVIRONMENT, console, one_line


def _warn_and_log():
    # Logging as in a plain process, without the handlers pytest puts on the root logger for the test.
    with mock.patch.object(logging.root, "handlers", []):
        _warn_and_log_in_a_bare_process()


def _warn_and_log_in_a_bare_process():
    warnings.warn("the vocabulary is small\nconsider a larger one", UserWarning, stacklevel=1)
    warnings.warn("this function moves in v3", DeprecationWarning, stacklevel=1)
    warnings.warn("this argument changes in v3", FutureWarning, stacklevel=1)
    # A library that sets itself up as Lightning does: its own handler, its own level, INFO.
    chatty = logging.getLogger("chatty_library")
    chatty.handlers[:] = [logging.StreamHandler(sys.stderr)]
    chatty.setLevel(logging.INFO)
    chatty.propagate = False
    chatty.info("Seed set to 1337")
    library = logging.getLogger("some_library.module")  # no handler of its own, like most libraries
    library.info("loading the data")
    library.warning("disk nearly full\n(92%)")


def test_quiet_warnings_are_one_line_and_library_deprecations_and_info_are_hidden(capfd):
    with console():
        _warn_and_log()
    out, err = capfd.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "warning: the vocabulary is small consider a larger one",
        "warning: disk nearly full (92%)",
    ]


def test_verbose_shows_everything_as_the_libraries_print_it(capfd):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with console(verbose=True):
            _warn_and_log()
    assert [w.category for w in caught] == [UserWarning, DeprecationWarning, FutureWarning]
    # The library's own handler, and logging's own last resort for the one without.
    assert capfd.readouterr().err == "Seed set to 1337\ndisk nearly full\n(92%)\n"


def test_everything_is_restored_afterwards():
    before = (
        warnings.showwarning,
        list(warnings.filters),
        logging.root.manager.disable,
        logging.lastResort,
        {name: os.environ.get(name) for name in QUIET_ENVIRONMENT},
    )
    with console():
        assert os.environ["TQDM_DISABLE"] == "1"
        assert logging.root.manager.disable == logging.INFO
    after = (
        warnings.showwarning,
        list(warnings.filters),
        logging.root.manager.disable,
        logging.lastResort,
        {name: os.environ.get(name) for name in QUIET_ENVIRONMENT},
    )
    assert after == before


def test_one_line():
    assert one_line("a\n  b\tc \n") == "a b c"


@pytest.mark.slow
def test_lightning_start_up_lines_are_off_in_a_fresh_process():
    """In a new process Lightning is imported after the policy is applied (as in `nexttoken fit`)."""
    code = (
        "from nexttoken.console import console\n"
        "with console():\n"
        "    import lightning as L\n"
        "    L.seed_everything(1)\n"
        "    L.Trainer(accelerator='cpu', logger=False)\n"
        "    from tqdm.auto import tqdm\n"
        "    for _ in tqdm(range(3), desc='Loading weights'): pass\n"
        "print('done')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("done\n", "")
