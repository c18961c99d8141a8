"""A command's start-up: when the process started, the marks that split its start-up into phases
(the interpreter, each big import) for the run's report (``nexttoken.training.phases``), and importing
torchmetrics without the optional integrations it would load at once.

The clock is ``time.perf_counter``; the process's start comes from ``/proc/self/stat`` where there is
one (Linux), else from when this module was imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import time
import types


def process_age() -> float | None:
    """Seconds since this process started, from /proc (Linux); None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime in ticks
    except (OSError, ValueError, IndexError):
        return None


_age = process_age()
PROCESS_START = time.perf_counter() - (_age if _age is not None else 0.0)
# (phase, when it ended): each phase runs from the previous mark (the first from the process start).
_MARKS: list[tuple[str, float]] = []


def mark(phase: str, now: float | None = None) -> None:
    """Close the start-up phase ``phase`` now: it ran since the previous mark (or the process start)."""
    _MARKS.append((phase, time.perf_counter() if now is None else now))


def clear_marks() -> None:
    """Forget the marks (a command run again in the same process starts its phases afresh)."""
    _MARKS.clear()


def startup_phases() -> tuple[dict[str, float], float]:
    """The marked phases as ``{phase: seconds}`` in order, and when the last one ended (the process
    start when nothing is marked). The phases add up to that moment less the process start."""
    seconds: dict[str, float] = {}
    previous = PROCESS_START
    for phase, end in _MARKS:
        seconds[phase] = seconds.get(phase, 0.0) + (end - previous)
        previous = end
    return seconds, previous


# What torchmetrics imports at once, for metrics nexttoken never computes through it: BERTScore's and
# CLIPScore's transformers, its audio metrics' scipy.signal, its plotting's matplotlib.pyplot. Measured
# on a 2-core CPU: 1.5-2.5 s of a 4-5 s start-up; the real modules still load when something uses them.
TORCHMETRICS_EXTRAS = ("transformers", "scipy", "matplotlib")


class _Placeholder(type):
    """A class standing for any name of a module not loaded: every attribute, call or subscript is
    another placeholder, so module-level code that only names things (type hints, decorators built
    from the module) runs."""

    def __getattr__(cls, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})

    def __call__(cls, *args, **kwargs) -> type:
        return _Placeholder(cls.__name__, (), {})

    def __getitem__(cls, item) -> type:
        return cls


class _PlaceholderModule(types.ModuleType):
    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers imports of ``names`` (and their submodules) with placeholder modules."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.made: list[str] = []

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".", 1)[0] not in self.names:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        module = _PlaceholderModule(spec.name)
        module.__path__ = []
        self.made.append(spec.name)
        return module

    def exec_module(self, module) -> None:
        pass


def import_torchmetrics_lean() -> None:
    """Import torchmetrics (as Lightning does on import) without the modules of
    :data:`TORCHMETRICS_EXTRAS` that it would load with it, when neither is loaded yet.

    While torchmetrics is imported, those names are placeholders, which its metrics that need them
    (BERTScore, CLIPScore, audio metrics, ``Metric.plot``) keep: they fail in this process, the
    others work. The placeholders leave ``sys.modules`` afterwards, so an ``import transformers``
    (a Hugging Face model, the curves' matplotlib) loads the real module. For a command's own
    process, which never computes those metrics, not for a library import."""
    if "torchmetrics" in sys.modules or any(name in sys.modules for name in TORCHMETRICS_EXTRAS):
        return
    finder = _PlaceholderFinder(TORCHMETRICS_EXTRAS)
    sys.meta_path.insert(0, finder)
    try:
        import torchmetrics  # noqa: F401
    finally:
        sys.meta_path.remove(finder)
        for name in finder.made:
            if isinstance(sys.modules.get(name), _PlaceholderModule):
                del sys.modules[name]
