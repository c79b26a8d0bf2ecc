#!/usr/bin/env bash
# ViSurf post-training of Qwen2.5-VL-7B-Instruct on a multi-node H100 Slurm cluster.
#
#   sbatch examples/run_visurf_7b.sh                                   # 4 nodes x 8 GPUs, the 7B config
#   HF_MODEL_DIR=/models/Qwen2.5-VL-7B-Instruct DATA_TRAIN=/data/train.jsonl sbatch examples/run_visurf_7b.sh
#   CONFIG=examples/configs/qwen2_5_vl_72b_visurf.yaml sbatch --nodes=8 examples/run_visurf_7b.sh
#   DRY_RUN=1 SLURM_NODELIST=gpu[003-004] SLURM_NNODES=2 SLURM_JOB_ID=1 bash examples/run_visurf_7b.sh
#
# Steps: (1) HF -> Megatron conversion into $RUN_DIR/megatron_init, once (skipped when
# visurf_meta.json is there); (2) training, one torchrun per node, c10d rendezvous on the first node;
# (3) the latest training checkpoint -> HF safetensors in $RUN_DIR/hf_final.
# Nothing is downloaded: HF_MODEL_DIR must be a local copy of the model.
# DRY_RUN=1 prints each command (one per line, starting with "+ ", shell-quoted) instead of running it;
# outside sbatch the caller supplies SLURM_NODELIST / SLURM_NNODES / SLURM_JOB_ID.
#
# The log path below is relative to the submit directory (Slurm does not create directories).
#SBATCH --job-name=visurf-7b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --exclusive
#SBATCH --output=visurf-%x-%j.out

set -euo pipefail

die() { echo "run_visurf_7b: error: $*" >&2; exit 2; }

# ---- repository root (sbatch runs a spooled copy of this file: fall back to the submit dir) ----
if [[ -z "${REPO_DIR:-}" ]]; then
  script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  if [[ -d "$script_dir/../visurf_megatron" ]]; then
    REPO_DIR=$(cd "$script_dir/.." && pwd)
  elif [[ -d "${SLURM_SUBMIT_DIR:-.}/visurf_megatron" ]]; then
    REPO_DIR=$(cd "${SLURM_SUBMIT_DIR:-.}" && pwd)
  else
    die "cannot find the repository; set REPO_DIR"
  fi
fi
cd "$REPO_DIR"

# ---- settings (all overridable from the environment) ----
HF_MODEL_DIR=${HF_MODEL_DIR:-$REPO_DIR/models/Qwen2.5-VL-7B-Instruct}
DATA_TRAIN=${DATA_TRAIN:-$REPO_DIR/data/visurf/train.jsonl}
DATA_VAL=${DATA_VAL:-}
CONFIG=${CONFIG:-examples/configs/qwen2_5_vl_7b_visurf.yaml}
RUN_DIR=${RUN_DIR:-$REPO_DIR/runs/$(basename "$CONFIG" .yaml)}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
PYTHON=${PYTHON:-python}
TORCHRUN=${TORCHRUN:-torchrun}
EXTRA=${EXTRA:-}                    # extra dotted config overrides, e.g. "train.steps=10 rollout.n=4"
SRUN_EXTRA_ARGS=${SRUN_EXTRA_ARGS:-}  # e.g. "--container-image=... --container-mounts=..." (pyxis)
CONVERT_BACK=${CONVERT_BACK:-1}
DRY_RUN=${DRY_RUN:-0}

[[ -n "${SLURM_NODELIST:-}" ]] || die "SLURM_NODELIST is not set (submit with sbatch, or set it for DRY_RUN=1)"
[[ -n "${SLURM_JOB_ID:-}" ]] || die "SLURM_JOB_ID is not set"
NNODES=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-}}
[[ -n "$NNODES" ]] || die "SLURM_NNODES is not set"
[[ -f "$CONFIG" ]] || die "config $CONFIG does not exist"
MASTER_PORT=${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 1000))}

# TP/PP default to the config's parallel.tp / parallel.pp, so the converted shards match the training.
if [[ -z "${TP:-}" || -z "${PP:-}" ]]; then
  read -r cfg_tp cfg_pp < <("$PYTHON" -c 'import sys
from visurf_megatron.config import load_config
c = load_config(sys.argv[1]); print(c.parallel.tp, c.parallel.pp)' "$CONFIG") \
    || die "cannot read parallel.tp/pp from $CONFIG"
  TP=${TP:-$cfg_tp}
  PP=${PP:-$cfg_pp}
fi

# ---- rendezvous host: the first node of the allocation ----
first_host() {
  local list=$1 hosts head prefix inner rest
  if command -v scontrol >/dev/null 2>&1; then
    hosts=$(scontrol show hostnames "$list")
    echo "${hosts%%$'\n'*}"
    return
  fi
  # No scontrol: parse "gpu[003-005,010],cpu1" -> gpu003 ourselves.
  head=${list%%,*}
  if [[ $head == *"["* ]]; then
    prefix=${list%%\[*}
    inner=${list#*\[}
    inner=${inner%%\]*}
    inner=${inner%%,*}
    rest=${list#*\]}
    echo "${prefix}${inner%%-*}${rest%%,*}"
  else
    echo "$head"
  fi
}
MASTER_ADDR=${MASTER_ADDR:-$(first_host "$SLURM_NODELIST")}
[[ -n "$MASTER_ADDR" ]] || die "cannot find the first host of SLURM_NODELIST=$SLURM_NODELIST"

# ---- NCCL / CUDA environment ----
export CUDA_DEVICE_MAX_CONNECTIONS=1        # megatron TP/SP comm-compute overlap needs ordered streams
export NCCL_NVLS_ENABLE=0                   # NVLink SHARP buffers cost GPU memory and hang on some fabrics
export TORCH_NCCL_AVOID_RECORD_STREAMS=1    # lower memory for async collectives
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export PYTHONUNBUFFERED=1
# Slurm >= 22.05: job steps no longer inherit --cpus-per-task; without this torchrun's 8 workers share 1 CPU.
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
# Cluster-specific; uncomment and adapt:
# export NCCL_IB_HCA=mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_4,mlx5_5,mlx5_6,mlx5_7
# export NCCL_SOCKET_IFNAME=eth0            # the interface the nodes reach each other on (bootstrap)
# export GLOO_SOCKET_IFNAME=eth0
# export NCCL_IB_GID_INDEX=3                # RoCE
# export NCCL_IB_DISABLE=1                  # TCP only (slow; for debugging)

# ---- helpers ----
read -r -a SRUN_EXTRA <<< "$SRUN_EXTRA_ARGS"
read -r -a EXTRA_OVERRIDES <<< "$EXTRA"

run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

INIT_DIR=$RUN_DIR/megatron_init
CKPT_DIR=$RUN_DIR/checkpoints
OVERRIDES=(
  "model.hf_path=$HF_MODEL_DIR"
  "model.megatron_path=$INIT_DIR"
  "data.train_path=$DATA_TRAIN"
  "checkpoint.dir=$CKPT_DIR"
  "logging.dir=$RUN_DIR/logs"
  "parallel.tp=$TP"
  "parallel.pp=$PP"
)
if [[ -n "$DATA_VAL" ]]; then OVERRIDES+=("data.val_path=$DATA_VAL"); fi
OVERRIDES+=("${EXTRA_OVERRIDES[@]}")
WORLD=$((NNODES * GPUS_PER_NODE))

echo "# run_visurf_7b: $NNODES node(s) x $GPUS_PER_NODE GPUs, tp=$TP pp=$PP, config=$CONFIG"
echo "# rendezvous $MASTER_ADDR:$MASTER_PORT, run dir $RUN_DIR"

# Fail fast (on the batch host, before any GPU work) on a config that does not fit this world.
"$PYTHON" -m visurf_megatron.config "$CONFIG" "${OVERRIDES[@]}" --world-size "$WORLD" >/dev/null \
  || die "the config does not validate for world size $WORLD (see above)"

if [[ "$DRY_RUN" != 1 ]]; then
  [[ -f "$HF_MODEL_DIR/config.json" ]] || die "HF_MODEL_DIR=$HF_MODEL_DIR has no config.json (no download is done)"
  [[ -f "$DATA_TRAIN" ]] || die "DATA_TRAIN=$DATA_TRAIN does not exist"
  mkdir -p "$RUN_DIR/logs"
fi

# ---- (1) HF -> Megatron, once ----
CONV_RANKS=$((TP * PP))
if [[ -f "$INIT_DIR/visurf_meta.json" ]]; then
  echo "# $INIT_DIR/visurf_meta.json exists: skipping the HF -> Megatron conversion"
else
  CONVERT_ARGS=(checkpoint_converters/hf_to_megatron.py --hf-dir "$HF_MODEL_DIR" --out-dir "$INIT_DIR"
                --tp "$TP" --pp "$PP" --dtype bf16 --overwrite --no-progress)
  if ((CONV_RANKS <= GPUS_PER_NODE)); then
    run srun --nodes=1 --ntasks=1 --ntasks-per-node=1 "${SRUN_EXTRA[@]}" \
      "$TORCHRUN" --standalone --nnodes=1 --nproc-per-node="$CONV_RANKS" "${CONVERT_ARGS[@]}"
  else
    # One rank per GPU (NCCL refuses two ranks on one GPU): spread tp*pp ranks over whole nodes.
    ((CONV_RANKS % GPUS_PER_NODE == 0)) || die "tp*pp=$CONV_RANKS is not a multiple of GPUS_PER_NODE=$GPUS_PER_NODE"
    CONV_NODES=$((CONV_RANKS / GPUS_PER_NODE))
    ((CONV_NODES <= NNODES)) || die "tp*pp=$CONV_RANKS ranks need $CONV_NODES nodes, the job has $NNODES"
    run srun --nodes="$CONV_NODES" --ntasks="$CONV_NODES" --ntasks-per-node=1 "${SRUN_EXTRA[@]}" \
      "$TORCHRUN" --nnodes="$CONV_NODES" --nproc-per-node="$GPUS_PER_NODE" --rdzv-backend=c10d \
      --rdzv-endpoint="$MASTER_ADDR:$((MASTER_PORT + 1))" --rdzv-id="$SLURM_JOB_ID-convert" "${CONVERT_ARGS[@]}"
  fi
fi

# ---- (2) training ----
run srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 "${SRUN_EXTRA[@]}" \
  "$TORCHRUN" --nnodes="$NNODES" --nproc-per-node="$GPUS_PER_NODE" --rdzv-backend=c10d \
  --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \
  -m visurf_megatron.train --config "$CONFIG" "${OVERRIDES[@]}"

# ---- (3) Megatron -> HF (the latest checkpoint under $CKPT_DIR) ----
if [[ "$CONVERT_BACK" == 1 ]]; then
  # Loading with tp=TP, pp=PP needs the same rank layout as the first conversion.
  BACK_ARGS=(checkpoint_converters/megatron_to_hf.py --megatron-dir "$CKPT_DIR" --out-dir "$RUN_DIR/hf_final"
             --hf-template "$HF_MODEL_DIR" --tp "$TP" --pp "$PP" --overwrite --no-progress)
  if ((CONV_RANKS <= GPUS_PER_NODE)); then
    run srun --nodes=1 --ntasks=1 --ntasks-per-node=1 "${SRUN_EXTRA[@]}" \
      "$TORCHRUN" --standalone --nnodes=1 --nproc-per-node="$CONV_RANKS" "${BACK_ARGS[@]}"
  else
    CONV_NODES=$((CONV_RANKS / GPUS_PER_NODE))
    run srun --nodes="$CONV_NODES" --ntasks="$CONV_NODES" --ntasks-per-node=1 "${SRUN_EXTRA[@]}" \
      "$TORCHRUN" --nnodes="$CONV_NODES" --nproc-per-node="$GPUS_PER_NODE" --rdzv-backend=c10d \
      --rdzv-endpoint="$MASTER_ADDR:$((MASTER_PORT + 2))" --rdzv-id="$SLURM_JOB_ID-export" "${BACK_ARGS[@]}"
  fi
  echo "# HF model: $RUN_DIR/hf_final"
fi
