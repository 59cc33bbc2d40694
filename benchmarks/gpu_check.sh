#!/usr/bin/env bash
# One-call GPU check for the Triton kernels, staged so that every result is on disk as soon as it
# exists and the whole script stays within ~5 minutes:
#   1 smoke   install (carried wheels + the project, no deps), a flash-attention call vs SDPA
#   2 tests   tests/kernels compiled on the GPU, fp32/fp16/bf16 (fixed tiles, no autotuning)
#   3 attention benchmark (bf16, head_dim 128, 8K and 16K) vs SDPA backends and FlexAttention
#   4 train   starcoderbase-1b 10 steps in fp32 (TF32) and in bf16 weights: tokens/s, MFU
#   5 kernels LayerNorm, bias-GeLU, bias-dropout-add, RoPE, cross-entropy vs eager, torch.compile,
#             Liger-Kernel
#   then the recompute memory check, and the selfalign vLLM backend test where vLLM is installed
# Results go to $OUT (or ./gpu_out): summary.md (grows stage by stage), check.log (everything),
# attention.md/.png, kernels.md/.png, memory.png -- at most 8 files, as the device tool returns.
# Usage, from the repository root on a GPU machine:  bash benchmarks/gpu_check.sh
# Missing wheels (Liger-Kernel) are read from .whl/ when present (see docs/kernels.md).
set -uo pipefail

OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/check.log
SUMMARY=$OUT/summary.md
BUDGET=${GPU_CHECK_BUDGET:-290}   # seconds for the whole script
START=$(date +%s)
STAGE_SECONDS=0
PY=${PYTHON:-python3}
WORK=${GPU_CHECK_WORK:-/tmp/starcoder-gpu-check}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
: >"$LOG"
printf '# GPU check (%s)\n\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$SUMMARY"

note() { printf '%s\n' "$@" | tee -a "$SUMMARY"; }
elapsed() { echo $(($(date +%s) - START)); }
# run_stage NAME SECONDS CMD...: the stage's own limit, cut to what the budget has left.
run_stage() {
    local name=$1 limit=$2 left rc t0
    shift 2
    left=$((BUDGET - $(elapsed)))
    ((limit > left)) && limit=$left
    if ((limit < 10)); then
        STAGE_SECONDS=0
        note "- **$name**: skipped, the ${BUDGET}s budget is spent"
        return 99
    fi
    echo "=== $name (limit ${limit}s, at $(elapsed)s) ===" >>"$LOG"
    t0=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    STAGE_SECONDS=$(($(date +%s) - t0))
    if ((rc == 124 || rc == 137)); then
        note "- **$name**: stopped at its ${limit}s limit (partial results kept)"
    elif ((rc != 0)); then
        note "- **$name**: FAILED (exit $rc, ${STAGE_SECONDS}s; see check.log)"
    fi
    return $rc
}

# --- 1 smoke -------------------------------------------------------------------------------------
note "## 1 smoke"
{
    nvidia-smi -L
    $PY -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
} >>"$LOG" 2>&1
SITE=$WORK/site
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl >>"$LOG" 2>&1 \
        && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} \
        && note "- wheels from .whl: $(cd .whl && ls *.whl | tr '\n' ' ')"
else
    note "- no .whl folder: Liger-Kernel columns will say 'not installed'"
fi
if ! $PY -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1; then
    note "- pip install -e . failed; using PYTHONPATH=$PWD"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
run_stage smoke 45 $PY - <<'EOF'
import torch, torch.nn.functional as F
from starcoder.kernels import flash_attention
q, k, v = (torch.randn(1, 1000, h, 128, device="cuda", dtype=torch.bfloat16) for h in (8, 2, 2))
out = flash_attention(q, k, v, window=300)
i = torch.arange(1000, device="cuda")
mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 300)
ref = F.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v)), attn_mask=mask,
                                     enable_gqa=True).transpose(1, 2)
err = ((out.float() - ref).norm() / ref.norm()).item()
print(f"flash_attention bf16 s=1000 window=300 GQA 8/2: relative error vs fp32 SDPA {err:.1e}")
assert err < 2e-2, err
EOF
[[ $? == 0 ]] && note "- $(grep 'relative error vs fp32 SDPA' "$LOG" | tail -1) (${STAGE_SECONDS}s)"

# --- 2 compiled kernel tests ---------------------------------------------------------------------
note "" "## 2 compiled kernel tests (fp32 as TF32, fp16, bf16)"
XDIST=""
$PY -c 'import xdist' 2>/dev/null && XDIST="-n 8"
export STARCODER_AUTOTUNE=0  # many small shapes: fixed tiles instead of tuning each one
run_stage tests 75 $PY -m pytest -q -p no:cacheprovider $XDIST tests/kernels -k "not hopper"
[[ $? != 99 ]] && note "- pytest: $(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed)' "$LOG" | tail -1) (${STAGE_SECONDS}s)"
unset STARCODER_AUTOTUNE

# --- 3 attention benchmark -----------------------------------------------------------------------
note "" "## 3 attention benchmark -> attention.md, attention.png"
run_stage attention 80 $PY benchmarks/kernels.py --only attention --quick --out "$OUT"
[[ $? != 99 ]] && note "- ran ${STAGE_SECONDS}s"

# --- 4 training steps of the 1B preset, before and after bf16 weights -------------------------
# Same preset, batch and data twice: "before" fp32 weights (train.precision=fp32; the trainer sets
# no TF32 flag, so TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 runs its cuBLAS matmuls as TF32), "after"
# bf16 weights with fp32 main weights and fp32 gradient reduction (train.precision=bf16).
note "" "## 4 train starcoderbase-1b, 10 steps each: fp32 (TF32) before, bf16 weights after"
CORPUS=$(timeout 40 $PY -c "
from pathlib import Path
from starcoder.cli.demo import prepare_corpus
print(prepare_corpus(Path('$WORK/data'), max_files=600))" 2>>"$LOG" | tail -1)
if [[ -z $CORPUS ]]; then
    note "- no training corpus (starcoder.cli.demo.prepare_corpus failed; see check.log)"
else
    RUNS=()
    for row in "before fp32 50 1" "after bf16 40 0"; do
        read -r label precision limit tf32 <<<"$row"
        rm -rf "$WORK/run-$label" "$WORK/metrics-$label.jsonl"
        run_stage "train $label" "$limit" \
            env TORCH_ALLOW_TF32_CUBLAS_OVERRIDE="$tf32" $PY -m starcoder train --config starcoderbase-1b \
            --set "data.paths=[$CORPUS]" --set data.tokenizer=builtin:tiny --set data.num_workers=2 \
            --set train.max_steps=10 --set train.micro_batch_size=1 --set train.global_batch_size=4 \
            --set train.seq_length=8192 --set train.eval_every=0 --set train.warmup_steps=2 \
            --set train.precision="$precision" \
            --set model.attention_dropout=0 --set model.hidden_dropout=0 --set model.embedding_dropout=0 \
            --set model.kernels=auto --set log.every=1 --set log.tensorboard=false \
            --set "train.output_dir=$WORK/run-$label"
        cp "$WORK/run-$label/metrics.jsonl" "$WORK/metrics-$label.jsonl" 2>/dev/null
        cat "$WORK/metrics-$label.jsonl" >>"$LOG" 2>/dev/null
        rm -rf "$WORK/run-$label"  # its final checkpoint: ~18 GB of fp32 weights and Adam state
        RUNS+=("$label" "$precision" "$WORK/metrics-$label.jsonl")
    done
    $PY benchmarks/gpu_train_table.py "${RUNS[@]}" | tee -a "$SUMMARY"
fi

# --- 5 the other microbenchmarks -----------------------------------------------------------------
note "" "## 5 kernel benchmarks -> kernels.md, kernels.png, memory.png"
run_stage kernels 75 $PY benchmarks/kernels.py --only layer_norm,bias_gelu,bias_dropout_add,rope,cross_entropy --out "$OUT"
[[ $? != 99 ]] && note "- ran ${STAGE_SECONDS}s"

# --- recompute: peak memory of starcoderbase-1b per recompute mode vs `starcoder plan` ----------
# benchmarks/recompute_memory.py: one micro-batch at 8K per mode (none, selective, full, full on
# half the blocks), torch.cuda.max_memory_allocated beside the planner's terms (issue 12 item 2).
note "" "## recompute memory, starcoderbase-1b (MiB above weights and gradients)"
# Fixed tiles (no autotuning): the step's memory is what is measured, not its speed.
run_stage recompute 60 env STARCODER_AUTOTUNE=0 $PY benchmarks/recompute_memory.py \
    --config starcoderbase-1b --out "$SUMMARY"
[[ $? != 99 ]] && note "- ran ${STAGE_SECONDS}s"

# --- vllm: the selfalign vLLM backend against the tiny models, where the image has vLLM -------
note "" "## vllm backend (starcoder selfalign --backend vllm)"
if $PY -c "import vllm" >>"$LOG" 2>&1; then
    run_stage vllm 90 $PY -m pytest -q -p no:cacheprovider -rs tests/selfalign/test_vllm_backend.py
    [[ $? != 99 ]] && note "- pytest: $(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed)' "$LOG" | tail -1) (${STAGE_SECONDS}s)"
else
    note "- vllm: not installed on this image, skipped"
fi

note "" "total $(elapsed)s"
