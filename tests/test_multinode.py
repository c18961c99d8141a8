"""Two "nodes" on one machine: two ``torchrun`` launches (``--nnodes 2 --node-rank 0/1``, one process
each, gloo on CPU, loopback only) running ``nexttoken fit --trainer.num_nodes 2``. The run's validation
numbers and final weights are those of one node with two processes and the same global batch, and
only global rank 0 writes the run folder, the report and the checkpoints."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_cli import fit_args, metric_rows, write_corpus

TESTS = Path(__file__).parent
pytestmark = pytest.mark.slow
TIMEOUT = 300  # seconds for a whole run: a hung rendezvous or collective fails the test, never CI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "GLOO_SOCKET_IFNAME": "lo",  # loopback only
        "OMP_NUM_THREADS": "1",
    }


def run_all(commands: list[tuple[list[str], Path]]) -> list[str]:
    """Start every ``(command, working folder)`` at once, each in its own process group; wait for all
    within TIMEOUT, and kill every group if one fails or time runs out."""
    processes = [
        subprocess.Popen(
            command,
            cwd=cwd,
            env=environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for command, cwd in commands
    ]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=TIMEOUT)[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"the run did not end within {TIMEOUT} s")
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-3000:]
    return outputs


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args, "-m", "nexttoken"]


def test_two_nodes_equal_two_processes_on_one_node_and_only_rank_0_writes(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_docs=6)
    cache = tmp_path / "cache"  # a filesystem both "nodes" share: one tokenizes, the other waits
    steps = 4

    def fit(root: str, *extra: str) -> list[str]:
        args = fit_args(corpus, Path(root), cache, steps, "--trainer.accelerator", "cpu", *extra)
        return args + ["--trainer.strategy", "ddp", "--trainer.val_check_interval", "2"]

    nodes = []
    port = free_port()
    for rank in (0, 1):
        folder = tmp_path / f"node{rank}"
        folder.mkdir()
        launch = torchrun(
            "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
            "--master-addr", "127.0.0.1", "--master-port", str(port),
        )  # fmt: skip
        nodes.append((launch + fit("runs", "--trainer.num_nodes", "2", "--trainer.devices", "1"), folder))
    outputs = run_all(nodes)
    assert "\nvalidation: all " in outputs[0] and "validation: " not in outputs[1]  # only rank 0 prints

    one_node = tmp_path / "one-node"
    one_node.mkdir()
    run_all([([sys.executable, "-m", "nexttoken", *fit("runs", "--trainer.devices", "2")], one_node)])

    # Node 1 wrote nothing in its working folder: no run folder, no report, no checkpoint.
    assert list((tmp_path / "node1").iterdir()) == []
    run, reference = tmp_path / "node0" / "runs" / "version_0", one_node / "runs" / "version_0"
    assert sorted(p.name for p in (tmp_path / "node0" / "runs").iterdir()) == ["version_0"]
    for name in ("report.txt", "report.json", "metrics.csv", "config.yaml", "checkpoints/last.ckpt"):
        assert (run / name).is_file(), name

    for metric in ("loss", "perplexity", "bits_per_byte"):
        mine, theirs = metric_rows(run, f"val/{metric}"), metric_rows(reference, f"val/{metric}")
        assert list(mine) == list(theirs) == [1, 3]  # steps are 0-based in metrics.csv
        assert list(mine.values()) == pytest.approx(list(theirs.values()), rel=1e-6, abs=1e-6), metric
    weights = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    expected = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(weights[name], tensor, atol=1e-6, rtol=0, msg=name)
