#!/usr/bin/env bash
# The first thing a lent GPU machine runs (DESIGN.md, "Devices by construction"): the GPU path end to
# end in one call of a few minutes, one summary line per check. See usage().
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PY:-python3}
WORK=${SMOKE_WORK:-/tmp/gpu_smoke}
LOGS=${SMOKE_LOGS:-${OUT:-$WORK}/smoke_logs}
SITE=${SMOKE_SITE:-/tmp/site}

CHECKS=(setup contracts parity te_fp8 packing convert train train_te train_pack vllm export)

usage() {
  cat <<'EOF'
Usage: tools/gpu_smoke.sh [--dry-run] [--only CHECK[,CHECK...]] [-h|--help]

Runs, on the machine's CUDA device, in this order (each check prints one line
"SMOKE <check> PASS|FAIL|SKIP <seconds>s <detail>"; the exit status is 1 if any check failed):
EOF
  for check in "${CHECKS[@]}"; do
    printf '  %-10s %s\n' "$check" "$(describe "$check")"
  done
  cat <<'EOF'

Environment: PY (python3), SMOKE_WORK (/tmp/gpu_smoke: checkpoints, data, runs), SMOKE_LOGS (each
check's full log; $OUT/smoke_logs when OUT is set, else $SMOKE_WORK/smoke_logs), SMOKE_SITE
(/tmp/site: where .whl/*.whl are installed when megatron-core is missing; `make gpu-wheels` makes
them on a machine with pip access). Without CUDA the checks that need it report SKIP.
EOF
}

describe() {
  case "$1" in
    setup) echo "megatron-core importable (else .whl/*.whl installed into \$SMOKE_SITE); GPU, torch, TE, vLLM versions" ;;
    contracts) echo "tests/unit/test_gpu_contracts.py: issue-17 contracts (device moves, nccl+gloo groups, vision FP8/recompute)" ;;
    parity) echo "tests/gpu/test_cuda_parity.py: megatron model vs transformers on CUDA, fp32 and bf16, via run_micro_batches" ;;
    te_fp8) echo "tests/gpu/test_te_fp8.py: Transformer Engine spec in bf16 and FP8 hybrid (SKIP without TE)" ;;
    packing) echo "tests/gpu/test_packed_thd.py: packed == padded on CUDA (local fp32); TE's THD path in BF16 and FP8 (TE part SKIPs without TE)" ;;
    convert) echo "HF -> Megatron -> HF with the converter CLIs on CUDA (tp 1); every tensor bit-identical" ;;
    train) echo "3 steps of the tiny ViSurf config on CUDA (local spec, HF engine, fp32); finite loss each step" ;;
    train_te) echo "3 steps with model.spec=te, bf16, fp8 hybrid (SKIP without TE)" ;;
    train_pack) echo "3 steps with packed micro-batches (train.max_tokens_per_micro_batch=256): TE bf16 + fp8 hybrid, else local fp32" ;;
    vllm) echo "tests/gpu/test_vllm_engine.py, then 3 steps with rollout.engine=vllm (SKIP without vLLM)" ;;
    export) echo "tests/gpu/test_export_quantized_gpu.py: NVFP4 export within FP4 rounding; vLLM serves the FP8 export (SKIP without modelopt)" ;;
    *) echo "unknown check"; return 1 ;;
  esac
}

has_module() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }
has_cuda() { "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; }

FAILED=0
SUMMARY=()

# report CHECK STATUS SECONDS DETAIL
report() {
  local line
  line=$(printf 'SMOKE %-10s %-4s %4ss %s' "$1" "$2" "$3" "$4")
  SUMMARY+=("$line")
  echo "$line"
  if [ "$2" = FAIL ]; then
    FAILED=1
    echo "---- last lines of $LOGS/$1.log"
    tail -n 25 "$LOGS/$1.log"
    echo "----"
  fi
}

# run CHECK TIMEOUT_S COMMAND...: PASS/FAIL from the exit status; pytest's "skipped" only -> SKIP.
# COMMAND may be one of the functions below (exported): timeout runs it in a child bash.
run() {
  local check=$1 limit=$2 start status detail
  shift 2
  start=$(date +%s)
  # shellcheck disable=SC2016  # "$@" is expanded by the child bash
  timeout "$limit" bash -c '"$@"' bash "$@" >"$LOGS/$check.log" 2>&1
  status=$?
  # what the check printed after "DETAIL: ", else pytest's final count line, else its last line
  detail=$(grep -o 'DETAIL: .*' "$LOGS/$check.log" | tail -n 1)
  detail=${detail#DETAIL: }
  [ -n "$detail" ] || detail=$(grep -E '[0-9]+ (passed|failed|skipped|errors?).* in [0-9.]+s' "$LOGS/$check.log" | tail -n 1)
  [ -n "$detail" ] || detail=$(tail -n 1 "$LOGS/$check.log")
  if [ "$status" -eq 124 ]; then
    report "$check" FAIL "$(( $(date +%s) - start ))" "timed out after ${limit}s"
  elif [ "$status" -ne 0 ]; then
    report "$check" FAIL "$(( $(date +%s) - start ))" "exit $status ${detail}"
  elif grep -qE '(^| )[0-9]+ skipped' <<<"$detail" && ! grep -qE '[0-9]+ passed' <<<"$detail"; then
    report "$check" SKIP "$(( $(date +%s) - start ))" "$detail"
  else
    report "$check" PASS "$(( $(date +%s) - start ))" "$detail"
  fi
}

pytest_run() { "$PY" -m pytest -p no:cacheprovider -o addopts= -q -rs --timeout=600 "$@"; }

check_setup() {
  local start
  start=$(date +%s)
  {
    if ! "$PY" -c "import megatron.core" 2>/dev/null; then
      if ! compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
        echo "megatron-core is not importable and there is no .whl/: run 'make gpu-wheels' and carry .whl"
        return 1
      fi
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$ROOT"/.whl/*.whl || return 1
      export PYTHONPATH="$SITE:$PYTHONPATH"
    fi
    "$PY" - <<'PYEOF'
import importlib.util, torch, megatron.core, transformers
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
cap = ".".join(map(str, torch.cuda.get_device_capability())) if torch.cuda.is_available() else "-"
te = "yes" if importlib.util.find_spec("transformer_engine") else "no"
vllm = "yes" if importlib.util.find_spec("vllm") else "no"
print(f"gpu={gpu} cc={cap} torch={torch.__version__} megatron-core={megatron.core.__version__} "
      f"transformers={transformers.__version__} te={te} vllm={vllm}")
PYEOF
  } >"$LOGS/setup.log" 2>&1
  local status=$?
  if [ "$status" -eq 0 ]; then
    report setup PASS "$(( $(date +%s) - start ))" "$(tail -n 1 "$LOGS/setup.log")"
  else
    report setup FAIL "$(( $(date +%s) - start ))" "megatron-core not importable"
  fi
  return "$status"
}

tiny_assets() {
  [ -f "$WORK/hf/config.json" ] || "$PY" tools/make_tiny_checkpoint.py "$WORK/hf" --seed 0 --heads 2 --kv-heads 2 || return 1
  [ -f "$WORK/data/train.jsonl" ] || "$PY" tools/make_synthetic_grounding.py --out "$WORK/data" --train 8 --val 2 \
    --size 56 --no-progress || return 1
}

convert_round_trip() {
  tiny_assets || return 1
  rm -rf "$WORK/megatron" "$WORK/hf_back"
  "$PY" checkpoint_converters/hf_to_megatron.py --hf-dir "$WORK/hf" --out-dir "$WORK/megatron" --tp 1 --no-progress &&
    "$PY" checkpoint_converters/megatron_to_hf.py --megatron-dir "$WORK/megatron" --out-dir "$WORK/hf_back" \
      --hf-template "$WORK/hf" --no-progress &&
    "$PY" - "$WORK/hf" "$WORK/hf_back" <<'PYEOF'
import sys, torch
from visurf_megatron.checkpoint.safetensors_io import open_hf_checkpoint
with open_hf_checkpoint(sys.argv[1]) as a, open_hf_checkpoint(sys.argv[2]) as b:
    names_a, names_b = sorted(a.keys()), sorted(b.keys())
    assert names_a == names_b, f"names differ: {sorted(set(names_a) ^ set(names_b))[:5]}"
    bad = [n for n in names_a if not torch.equal(a[n], b[n])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:5]}"
print(f"\nDETAIL: {len(names_a)} tensors bit-identical after HF -> Megatron -> HF")
PYEOF
}

# train_steps NAME OVERRIDES...: 3 steps of the tiny ViSurf config; finite loss on each.
train_steps() {
  local name=$1
  shift
  tiny_assets || return 1
  rm -rf "${WORK:?}/$name"
  "$PY" -m visurf_megatron.train --config examples/configs/tiny_visurf.yaml \
    model.hf_path="$WORK/hf" model.megatron_path=null parallel.tp=1 train.steps=3 train.micro_batch_size=3 \
    data.train_path="$WORK/data/train.jsonl" data.val_path=null data.image_size=56 data.prompts_per_step=2 \
    rollout.n=2 rollout.max_new_tokens=16 checkpoint.dir="$WORK/$name/ckpt" logging.dir="$WORK/$name/logs" \
    logging.tensorboard=false "$@" &&
    "$PY" - "$WORK/$name/logs/metrics.jsonl" <<'PYEOF'
import json, math, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
assert [r["step"] for r in rows] == [1, 2, 3], [r["step"] for r in rows]
for r in rows:
    assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]), r
print("\nDETAIL: steps " + ", ".join(f"{r['step']}: loss {r['loss']:.4g} grad_norm {r['grad_norm']:.3g}" for r in rows))
PYEOF
}

train_packed() {
  if has_module transformer_engine; then
    train_steps train_packed model.spec=te model.dtype=bf16 model.fp8=hybrid rollout.engine=hf \
      train.max_tokens_per_micro_batch=256
  else
    train_steps train_packed model.spec=local model.dtype=fp32 rollout.engine=hf train.max_tokens_per_micro_batch=256
  fi
}

vllm_check() {
  pytest_run tests/gpu/test_vllm_engine.py && train_steps train_vllm rollout.engine=vllm
}

run_check() {
  local check=$1
  case "$check" in
    setup) check_setup ;;
    contracts) run contracts 240 pytest_run tests/unit/test_gpu_contracts.py ;;
    parity) run parity 240 pytest_run tests/gpu/test_cuda_parity.py ;;
    te_fp8)
      if has_module transformer_engine; then run te_fp8 240 pytest_run tests/gpu/test_te_fp8.py
      else report te_fp8 SKIP 0 "transformer_engine not installed"; fi ;;
    packing) run packing 300 pytest_run -s tests/gpu/test_packed_thd.py ;;
    convert) run convert 180 convert_round_trip ;;
    train) run train 240 train_steps train model.spec=local model.dtype=fp32 rollout.engine=hf ;;
    train_te)
      if has_module transformer_engine && has_cuda; then
        run train_te 240 train_steps train_te model.spec=te model.dtype=bf16 model.fp8=hybrid rollout.engine=hf
      else report train_te SKIP 0 "needs CUDA and transformer_engine"; fi ;;
    train_pack) run train_pack 240 train_packed ;;
    vllm)
      if has_module vllm && has_cuda; then
        run vllm 300 vllm_check
      else report vllm SKIP 0 "needs CUDA and vllm"; fi ;;
    export)
      if has_module modelopt && has_cuda; then
        run export 300 pytest_run tests/gpu/test_export_quantized_gpu.py
      else report export SKIP 0 "needs CUDA and nvidia-modelopt"; fi ;;
  esac
}

main() {
  local dry_run=0 only=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --dry-run) dry_run=1 ;;
      --only) only=${2:?--only needs a list of checks}; shift ;;
      -h|--help) usage; return 0 ;;
      *) echo "unknown argument: $1" >&2; usage >&2; return 2 ;;
    esac
    shift
  done
  local selected=("${CHECKS[@]}")
  if [ -n "$only" ]; then
    IFS=, read -r -a selected <<<"$only"
    for check in "${selected[@]}"; do
      describe "$check" >/dev/null || { echo "unknown check: $check (known: ${CHECKS[*]})" >&2; return 2; }
    done
  fi
  if [ "$dry_run" -eq 1 ]; then
    echo "gpu_smoke checks (dry run; nothing is run):"
    for check in "${selected[@]}"; do
      printf '  %-10s %s\n' "$check" "$(describe "$check")"
    done
    return 0
  fi
  cd "$ROOT" || return 1
  mkdir -p "$WORK" "$LOGS"
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
  export PY WORK
  export -f has_module pytest_run tiny_assets convert_round_trip train_steps train_packed vllm_check
  local start
  start=$(date +%s)
  # Without megatron-core nothing else can run.
  check_setup || { echo "SMOKE summary: setup failed"; return 1; }
  for check in "${selected[@]}"; do
    [ "$check" = setup ] || run_check "$check"
  done
  echo "SMOKE summary ($(( $(date +%s) - start ))s):"
  printf '%s\n' "${SUMMARY[@]}"
  return "$FAILED"
}

main "$@"
