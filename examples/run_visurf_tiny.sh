#!/usr/bin/env bash
# The README's main job, on one CPU machine (2 ranks, TP2): tiny random Qwen2.5-VL + synthetic
# grounding data -> HF->Megatron -> SFT warm-up (the "pre-trained knowledge") -> ViSurf -> Megatron->HF,
# then a summary (rewards before/after, plots, where the HF model is). Re-running resumes.
#
# Knobs (environment): OUT (default outputs/tiny), SFT_STEPS (150), VISURF_STEPS (40), NPROC (2), PY.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/tiny}
SFT_STEPS=${SFT_STEPS:-150}
VISURF_STEPS=${VISURF_STEPS:-40}
NPROC=${NPROC:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
start=$(date +%s)

step() { printf '\n== %s\n' "$*"; }

step "1/6 tiny Qwen2.5-VL checkpoint -> $OUT/hf"
if [ ! -f "$OUT/hf/config.json" ]; then
  # Two heads of 32: vLLM's CPU attention (the rollout engine) takes head sizes of 32 and up.
  "$PY" tools/make_tiny_checkpoint.py "$OUT/hf" --seed 0 --heads 2 --kv-heads 2
fi

step "2/6 synthetic grounding data -> $OUT/data"
if [ ! -f "$OUT/data/train.jsonl" ]; then
  "$PY" tools/make_synthetic_grounding.py --out "$OUT/data" --train 64 --val 16 --size 112 --no-progress
fi

step "3/6 HF -> Megatron (TP2) -> $OUT/megatron_init"
if [ ! -f "$OUT/megatron_init/visurf_meta.json" ]; then
  "$PY" checkpoint_converters/hf_to_megatron.py --hf-dir "$OUT/hf" --out-dir "$OUT/megatron_init" --tp 2 --no-progress
fi

common=(model.hf_path="$OUT/hf" data.train_path="$OUT/data/train.jsonl")

step "4/6 SFT warm-up, $SFT_STEPS steps"
"$PY" -m visurf_megatron.train --config examples/configs/tiny_sft.yaml --nproc "$NPROC" "${common[@]}" \
  model.megatron_path="$OUT/megatron_init" train.steps="$SFT_STEPS" \
  checkpoint.dir="$OUT/sft/checkpoints" logging.dir="$OUT/sft/logs"

step "5/6 ViSurf, $VISURF_STEPS steps"
"$PY" -m visurf_megatron.train --config examples/configs/tiny_visurf.yaml --nproc "$NPROC" "${common[@]}" \
  data.val_path="$OUT/data/val.jsonl" model.megatron_path="$OUT/sft/checkpoints" train.steps="$VISURF_STEPS" \
  checkpoint.dir="$OUT/visurf/checkpoints" logging.dir="$OUT/visurf/logs"

step "6/6 Megatron -> HF -> $OUT/hf_final"
"$PY" checkpoint_converters/megatron_to_hf.py --megatron-dir "$OUT/visurf/checkpoints" --out-dir "$OUT/hf_final" \
  --hf-template "$OUT/hf" --overwrite --no-progress

"$PY" tools/plot_metrics.py "$OUT/visurf/logs" --out "$OUT/plots" >/dev/null
"$PY" - "$OUT" "$(( $(date +%s) - start ))" <<'PYEOF'
import json, sys
out, seconds = sys.argv[1], sys.argv[2]
rows = [json.loads(l) for l in open(f"{out}/visurf/logs/metrics.jsonl")]
k = max(1, min(5, len(rows) // 4))
def mean(key, part):
    vals = [r[key] for r in part if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else float("nan")
first, last = rows[:k], rows[-k:]
print("\n== summary")
print(f"ViSurf steps: {len(rows)}   wall time: {seconds}s")
for key in ("reward/total", "reward/accuracy", "reward/thinking", "reward/answer_format", "entropy", "gt_logp"):
    print(f"{key:22s} first {k} steps: {mean(key, first):8.4f}   last {k} steps: {mean(key, last):8.4f}")
print(f"metrics: {out}/visurf/logs/metrics.jsonl (TensorBoard: {out}/visurf/logs/tensorboard)")
print(f"plots:   {out}/plots")
print(f"HF model: {out}/hf_final")
PYEOF
