"""A command's start-up: the process clock and the phases it is split into, the lean torchmetrics
import, the lazy command dispatch and the quick exit (each in a fresh interpreter where it matters)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nexttoken import startup
from nexttoken.startup import PROCESS_START, mark, startup_phases

SRC = str(Path(__file__).resolve().parents[1] / "src")


def python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)


@pytest.fixture
def no_marks():
    saved = list(startup._MARKS)
    startup.clear_marks()
    yield
    startup._MARKS[:] = saved


def test_phases_follow_one_another_from_the_process_start(no_marks):
    assert startup_phases() == ({}, PROCESS_START)
    mark("interpreter", PROCESS_START + 0.25)
    mark("import torch", PROCESS_START + 1.0)
    mark("import lightning", PROCESS_START + 1.5)
    mark("import torch", PROCESS_START + 1.75)  # a phase marked twice counts both stretches
    seconds, end = startup_phases()
    assert list(seconds) == ["interpreter", "import torch", "import lightning"]
    assert seconds == pytest.approx({"interpreter": 0.25, "import torch": 1.0, "import lightning": 0.5})
    assert end == PROCESS_START + 1.75
    assert sum(seconds.values()) == pytest.approx(end - PROCESS_START)


def test_the_process_start_is_when_the_process_started():
    # Half a second passes in the child before anything of nexttoken is imported: its clock sees it.
    out = python(
        "import time; time.sleep(0.5); from nexttoken.startup import process_age, PROCESS_START;"
        "print(process_age(), time.perf_counter() - PROCESS_START)"
    )
    age, since_start = map(float, out.stdout.split())
    assert 0.5 <= age < 60 and 0.5 <= since_start < 60


def test_torchmetrics_comes_without_transformers_scipy_and_matplotlib():
    out = python(
        "import sys\n"
        "from nexttoken.startup import import_torchmetrics_lean, TORCHMETRICS_EXTRAS\n"
        "import_torchmetrics_lean()\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(TORCHMETRICS_EXTRAS)))\n"
        "import torch\n"
        "from nexttoken.metrics import NextTokenMetrics\n"
        "m = NextTokenMetrics()\n"
        "m.update(torch.tensor(6.0), torch.tensor(3), torch.tensor(4))\n"
        "print(float(m.compute()['loss']))\n"
        # Imported afterwards, they are the real modules.
        "import importlib.util, matplotlib.colors\n"
        "print(matplotlib.colors.to_hex('red'), importlib.util.find_spec('transformers').origin)\n"
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[:2] == ["[]", "2.0"]
    assert lines[2].startswith("#ff0000 ") and lines[2].endswith("transformers/__init__.py")


def test_a_command_imports_only_its_own_module():
    out = python(
        "import sys\n"
        "from nexttoken import cli\n"
        "cli.check_command_line(['overlap', 'eval.txt', 'corpus'])\n"
        "cli._parser('overlap').format_help()\n"
        "cli._parser('export').format_help()\n"
        "print(sorted(m for m in ('torch', 'lightning', 'transformers', 'nexttoken.commands.eval',"
        " 'nexttoken.commands.fit') if m in sys.modules))\n"
        "print('nexttoken.commands.overlap' in sys.modules)\n"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", "True"]


def test_the_quick_exit_keeps_the_status_the_output_the_threads_and_atexit():
    out = python(
        "import atexit, sys, threading, time\n"
        "from nexttoken.cli import exit_now\n"
        "atexit.register(lambda: print('atexit ran'))\n"
        "threading.Thread(target=lambda: (time.sleep(0.2), print('thread done'))).start()\n"
        "sys.stdout.write('buffered output; ')\n"  # a pipe: block-buffered, not yet written
        "sys.stderr.write('on stderr')\n"
        "exit_now(3)\n"
        "print('never')\n"
    )
    assert out.returncode == 3
    assert out.stdout == "buffered output; thread done\natexit ran\n"
    assert out.stderr == "on stderr"


@pytest.mark.slow  # a whole fit in a fresh interpreter: 6-8 s on 2 free cores
def test_a_run_as_its_own_process_accounts_for_its_time_from_the_process_start(tmp_path):
    import json
    import time

    from test_cli import fit_args, write_corpus

    corpus = write_corpus(tmp_path / "corpus")
    args = fit_args(
        corpus, tmp_path / "runs", tmp_path / "cache", 2, "--trainer.enable_progress_bar", "false"
    )
    started = time.perf_counter()
    out = python(
        "import gc, sys\n"
        "from nexttoken.cli import main\n"
        "status = main(sys.argv[1:], whole_process=True)\n"
        "print(status, gc.get_freeze_count() > 10000, [m for m in ('transformers', 'scipy') if m in sys.modules])\n",
        *args,
    )
    wall = time.perf_counter() - started
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip().split("\n")[-1] == "0 True []"  # imports frozen; no transformers, no scipy
    phases = json.loads((tmp_path / "runs" / "version_0" / "report.json").read_text())["phases"]
    seconds = phases["seconds"]
    assert list(seconds)[:5] == [
        "interpreter",
        "import torch",
        "import torchmetrics",
        "import lightning",
        "import nexttoken",
    ]
    # From the process start, phase after phase, to the end of the report: within what the process
    # took as seen from here (which also holds the start of the interpreter and its exit).
    assert sum(seconds.values()) == pytest.approx(phases["total_seconds"], abs=0.005)
    assert 0 < phases["total_seconds"] < wall
    assert seconds["interpreter"] > 0
