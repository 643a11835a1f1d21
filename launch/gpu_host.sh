#!/bin/bash
# MVAR training on one host with several GPUs: one process drives all of them.
#
#   bash launch/gpu_host.sh                 # train (edit the EDIT block first)
#   bash launch/gpu_host.sh --dry_run       # print the command, run nothing
#   MODE=sample bash launch/gpu_host.sh     # samples.npz for FID from the workdir's checkpoint
#
# One process sees every GPU of the host (jax.devices()); the mesh is data x fsdp over them
# (`--config.mesh.fsdp=N` shards parameters and optimizer state over N GPUs). No distributed
# start-up is needed. If the run is stopped (SIGTERM, e.g. by a scheduler) it saves and exits
# with the preemption code; rerunning this script resumes from $WORKDIR.
# To debug multi-process code on this host, run the same command as several processes:
#   python launch/local_multiprocess.py --num_processes=2 --platform=gpu --gpus=8 -- python main.py ...

set -euo pipefail

# ------------------------------------------------------------------ EDIT: your machine and run
PYTHON=${PYTHON:-python3}                          # a Python with requirements.txt + jax[cuda12]
GPUS=${GPUS:-0,1,2,3,4,5,6,7}                      # the GPUs to use
CONFIG=${CONFIG:-configs/mvar_d16.py}
WORKDIR=${WORKDIR:-workdirs/mvar_d16}
TOKENIZER=${TOKENIZER:-weights/mvar_d16}           # converted VQ-VAE dir (python -m mvar_jax.convert)
DATA_DIR=${DATA_DIR:-$HOME/tensorflow_datasets}    # TFDS data_dir (imagenet2012 prepared there)
MANUAL_DIR=${MANUAL_DIR:-/data/imagenet}           # ILSVRC2012_img_{train,val}.tar (first run only)
MODE=${MODE:-train}                                # train | sample
EXTRA_FLAGS=${EXTRA_FLAGS:-}                       # more --config.x=y overrides
# ------------------------------------------------------------------

DRY_RUN=false
[[ "${1:-}" == "--dry_run" ]] && DRY_RUN=true
cd "$(dirname "$0")/.."

# shellcheck disable=SC2206  # EXTRA_FLAGS is split into words on purpose
CMD=(env CUDA_VISIBLE_DEVICES="$GPUS" "$PYTHON" main.py --mode="$MODE" --config="$CONFIG"
     --workdir="$WORKDIR" --config.tokenizer.checkpoint="$TOKENIZER"
     --config.data.name=imagenet2012 --config.data.data_dir="$DATA_DIR"
     --config.data.manual_dir="$MANUAL_DIR" $EXTRA_FLAGS)

if $DRY_RUN; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
exec "${CMD[@]}"
