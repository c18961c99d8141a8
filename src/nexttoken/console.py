"""What the command line shows, decided in one place.

Quiet by default: the libraries' start-up chatter (Lightning's "Seed set to", "GPU available",
"💡 Tip" and "`Trainer.fit` stopped" lines, transformers' info and progress bars) is off, a warning
is one line ``warning: ...`` without a source line, and a library's deprecation warning about its own
code is not shown. ``nexttoken --verbose`` leaves every library's output as the library makes it.

:func:`cli.main <nexttoken.cli.main>` runs each command inside :func:`console`. The processes
Lightning starts for DDP re-run the same command, so they follow the same policy; the environment
variables below reach them too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator

# Read when a library is imported: tqdm's default for the bars that do not choose for themselves
# (transformers' "Loading weights", "Converting and de-quantizing GGUF tensors", "Writing model
# shards"; ours and Lightning's choose), and transformers' and huggingface_hub's own switches.
QUIET_ENVIRONMENT = {
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
# A library's notice that its own code will change: nothing a user of the command can act on.
LIBRARY_DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
# Lightning advice that does not apply to nexttoken: validation numbers are already summed over
# processes by NextTokenMetrics (every rank logs the same value), and our IterableDatasets' lengths
# are exact.
NOT_APPLICABLE = (".*sync_dist=True.*", ".*IterableDataset.*has `__len__` defined.*")


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) made one space."""
    return " ".join(str(text).split())


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A ``warnings.showwarning`` that prints ``warning: MESSAGE`` on one line, without the file,
    line number and source line of the library that raised it."""
    (file or sys.stderr).write(f"warning: {one_line(message)}\n")


class OneLineFormatter(logging.Formatter):
    """A log record as ``warning: ...`` or ``error: ...`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {one_line(record.getMessage())}"


@contextlib.contextmanager
def console(verbose: bool = False) -> Iterator[None]:
    """Apply the console policy while one command runs; restore what it changed afterwards."""
    with warnings.catch_warnings(), _restored_environment(), _restored_loggers():
        for message in NOT_APPLICABLE:
            warnings.filterwarnings("ignore", message=message)
        if verbose:  # the libraries as they are, and nexttoken's own progress notes
            logging.getLogger("nexttoken").setLevel(logging.INFO)
            logging.getLogger("nexttoken").addHandler(logging.StreamHandler())
            yield
            return
        warnings.showwarning = show_warning
        for category in LIBRARY_DEPRECATIONS:
            warnings.filterwarnings("ignore", category=category)
        for name, value in QUIET_ENVIRONMENT.items():
            os.environ.setdefault(name, value)
        # Lightning's start-up lines are INFO records, and Lightning sets its loggers' levels when it is
        # imported: so INFO is off for every logger. A warning logged where no handler is set up
        # prints as one line (logging's last resort; Lightning and transformers bring handlers).
        logging.disable(logging.INFO)
        logging.lastResort = logging.StreamHandler()
        logging.lastResort.setLevel(logging.WARNING)
        logging.lastResort.setFormatter(OneLineFormatter())
        yield


@contextlib.contextmanager
def _restored_environment() -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in QUIET_ENVIRONMENT}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _restored_loggers() -> Iterator[None]:
    ours = logging.getLogger("nexttoken")
    level, handlers = ours.level, list(ours.handlers)
    disabled, last_resort = logging.root.manager.disable, logging.lastResort
    try:
        yield
    finally:
        logging.disable(disabled)
        logging.lastResort = last_resort
        ours.setLevel(level)
        ours.handlers[:] = handlers
