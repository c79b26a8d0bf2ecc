#!/usr/bin/env bash
# torchrun inside the GPU image under Apptainer: a TORCHRUN for examples/run_visurf_7b.sh, which runs
# "$TORCHRUN" as one word in every srun step.
#
#   SIF=/images/visurf-megatron.sif APPTAINER_BIND=/data,/scratch PYTHONPATH=$PWD \
#   TORCHRUN=$PWD/docker/apptainer_torchrun.sh sbatch examples/run_visurf_7b.sh
#
# --nv binds the host's NVIDIA driver; the environment (NCCL_*, MASTER_*, PYTHONPATH...) passes through
# as Apptainer does by default; APPTAINER_BIND (read by apptainer itself) adds data/model directories.
set -euo pipefail
: "${SIF:?set SIF to the .sif built from the GPU image (apptainer build X.sif docker-daemon://visurf-megatron:gpu)}"
command -v apptainer >/dev/null 2>&1 || { echo "apptainer_torchrun: apptainer not found" >&2; exit 2; }
exec apptainer exec --nv --pwd "$PWD" "$SIF" torchrun "$@"
