#!/usr/bin/env bash
# Closing the loop (SelfCodeAlign, arXiv 2410.24198): a base model writes its own instruction data,
# is fine-tuned on it with the StarCoder2-Instruct recipe, and is scored on HumanEval.
#
#   1. starcoder selfalign    MODEL writes tasks and tested responses; those passing their own
#                             tests in the sandbox are kept       -> $OUT/selfalign/select/00000.jsonl
#   2. starcoder preprocess   --format instruct, MODEL's tokenizer -> $OUT/data/instruct.{bin,idx}
#   3. starcoder train        SFT from MODEL (train.init_from) with RECIPE            -> $OUT/run
#   4. starcoder eval humaneval   the fine-tuned run                 -> $OUT/eval/summary.json
#
# Settings, as environment variables (the *_ARGS, TRAIN_SET and TRAIN_CMD are split on
# spaces and newlines):
#   MODEL             the base: a native model or training run folder, or a Hugging Face folder
#   OUT               runs/selfalign-pipeline; everything is written under it
#   SEEDS             stdlib (selfalign --seeds: Python files or folders)
#   SELFALIGN_CONFIG  configs/selfalign/default.yaml (paths here: from this repository's root)
#   SELFALIGN_ARGS    more selfalign flags, after the script's (a flag given again wins: --stages,
#                     --input, --backend vllm, --executor slurm, --set KEY=VALUE)
#   DEVICE            cpu (selfalign and eval --device; training picks its own device)
#   TOKENIZER         MODEL's own (its tokenizer.json, or its latest checkpoint's)
#   RECIPE            configs/recipes/starcoder2-instruct-sft.yaml
#   MODEL_SHAPE       a preset whose whole model section (dropouts included) replaces the recipe's
#                     StarCoder2-15B one, for a base of another shape (starcoder2-7b, tiny-sc2)
#   TRAIN_SET         more train flags (--set KEY=VALUE ...)
#   TRAIN_CMD         "$PYTHON -m starcoder train"; e.g. "torchrun --nproc-per-node 8 -m starcoder train"
#   EVAL_ARGS         more eval flags (--limit N --n-samples N --max-new-tokens N ...)
#   PYTHON            python
#
# Rerunning the same command goes on where it stopped. selfalign resumes its folder (finished
# shards are not redone; changed settings are refused). Under Slurm it only submits jobs: run this
# again once they have ended and $OUT/selfalign/report.json exists (it is then not resubmitted;
# delete the file to resubmit). preprocess is skipped while its report is newer than the selected
# pairs; train resumes $OUT/run from its latest checkpoint, and refuses data remade after the run
# began (delete $OUT/run to retrain); eval resumes $OUT/eval, which refuses other weights.
#
# StarCoder2-15B on a GPU cluster: the first run submits selfalign's stages as Slurm jobs (vLLM);
# run it again, on a node with 8 GPUs, once they have ended:
#   MODEL=models/starcoder2-15b OUT=runs/sc2-instruct DEVICE=cuda \
#   SELFALIGN_ARGS="--backend vllm --executor slurm --set run.slurm_partition=gpu --set run.tasks=8" \
#   TRAIN_CMD="torchrun --nproc-per-node 8 -m starcoder train" tools/selfalign_pipeline.sh
# The tiny CPU run on the `make train` model, under a minute. The model's own responses almost
# never pass their tests, so it stops after step 1 (exit 2); with SELFALIGN_ARGS="--stages
# validate,select --input tests/selfalign/planted.jsonl" (planted responses, some pass; what
# tests/selfalign/test_pipeline_script.py runs) every step runs:
#   MODEL=runs/demo/run MODEL_SHAPE=tiny-sc2 SELFALIGN_CONFIG=configs/selfalign/tiny.yaml \
#   TRAIN_SET="--set parallel.tensor_parallel=1 --set parallel.sequence_parallel=false
#     --set parallel.distributed_optimizer=false --set train.seq_length=256
#     --set train.global_batch_size=4 --set train.micro_batch_size=4 --set train.precision=fp32" \
#   EVAL_ARGS="--limit 4 --max-new-tokens 64" tools/selfalign_pipeline.sh
set -euo pipefail

: "${MODEL:?set MODEL to the base model folder (see the header of $0)}"
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-runs/selfalign-pipeline}
PYTHON=${PYTHON:-python}
DEVICE=${DEVICE:-cpu}
RECIPE=${RECIPE:-$repo/configs/recipes/starcoder2-instruct-sft.yaml}
TRAIN_CMD=${TRAIN_CMD:-$PYTHON -m starcoder train}
words() { read -ra "$1" -d '' <<< "$2" || true; }  # split on spaces and newlines, no globbing
words selfalign_args "${SELFALIGN_ARGS:-}"
words train_set "${TRAIN_SET:-}"
words eval_args "${EVAL_ARGS:-}"
words train_cmd "$TRAIN_CMD"
starcoder=("$PYTHON" -m starcoder)
selected=$OUT/selfalign/select/00000.jsonl
data=$OUT/data/instruct
run=$OUT/run

tokenizer=${TOKENIZER:-$MODEL}
if [[ -z ${TOKENIZER:-} && -f $MODEL/checkpoints/latest ]]; then  # a training run: its checkpoint's
    tokenizer=$MODEL/checkpoints/$(< "$MODEL/checkpoints/latest")
fi

shape=()  # checked before step 1, not hours later
if [[ -n ${MODEL_SHAPE:-} ]]; then  # the preset's model section, every key, as --set items
    shape_lines=$("$PYTHON" -c '
import dataclasses, json, sys
from starcoder.config import UserError, load_config
try:
    model = load_config(sys.argv[1]).model
except UserError as err:
    print(f"error: MODEL_SHAPE={sys.argv[1]}: {err}", file=sys.stderr)
    sys.exit(2)
for key, value in dataclasses.asdict(model).items():
    print(f"--set\nmodel.{key}={json.dumps(value)}")' "$MODEL_SHAPE")
    mapfile -t shape <<< "$shape_lines"
fi

echo "== 1/4 selfalign -> $OUT/selfalign"
if [[ " ${selfalign_args[*]} " =~ " --executor"[=\ ]"slurm " && -f $OUT/selfalign/report.json ]]; then
    echo "the Slurm jobs have ended ($OUT/selfalign/report.json): not resubmitted"
else
    "${starcoder[@]}" selfalign --model "$MODEL" --seeds "${SEEDS:-stdlib}" --output "$OUT/selfalign" \
        --config "${SELFALIGN_CONFIG:-$repo/configs/selfalign/default.yaml}" --device "$DEVICE" \
        "${selfalign_args[@]}"
fi
if [[ ! -f $OUT/selfalign/report.json ]]; then
    echo "selfalign was submitted: run this script again once $OUT/selfalign/report.json exists"
    exit 0
fi
if [[ ! -s $selected ]]; then
    echo "error: selfalign kept no passing response: nothing to fine-tune on; see $OUT/selfalign/report.json" >&2
    exit 2
fi

echo "== 2/4 preprocess $selected -> $data"
if [[ $data.json -nt $selected ]]; then
    echo "$data.json is newer than $selected: not remade"
else
    "${starcoder[@]}" preprocess --input "$selected" --tokenizer "$tokenizer" --output-prefix "$data" \
        --format instruct --no-progress
fi

echo "== 3/4 train $RECIPE from $MODEL -> $run"
if [[ -f $run/config.yaml && $data.json -nt $run/config.yaml ]]; then
    echo "error: $data was remade after $run began: delete $run to train on it" >&2
    exit 2
fi
"${train_cmd[@]}" --config "$RECIPE" "${shape[@]}" --set "train.init_from=$MODEL" \
    --set "data.paths=[$data]" --set "data.tokenizer=$tokenizer" --set "train.output_dir=$run" \
    "${train_set[@]}"

echo "== 4/4 eval humaneval $run -> $OUT/eval"
"${starcoder[@]}" eval humaneval --model "$run" --output "$OUT/eval" --device "$DEVICE" "${eval_args[@]}"

echo
echo "instruction pairs  $selected (report: $OUT/selfalign/report.json)"
echo "instruct data      $data.bin/.idx (report: $data.json)"
echo "fine-tuned run     $run (checkpoints/latest)"
echo "HumanEval          $OUT/eval/summary.json"
