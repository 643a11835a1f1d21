#!/bin/bash
# MVAR training on a Cloud TPU pod slice: the same main.py on every host (--worker=all).
#
#   bash launch/tpu_pod.sh create     # make the TPU VM (all hosts of the slice)
#   bash launch/tpu_pod.sh setup      # copy this repository to every host, install, mount the disk
#   bash launch/tpu_pod.sh train      # run main.py on every host; rerun after a preemption
#   bash launch/tpu_pod.sh sample     # --mode=sample on every host (samples.npz for FID)
#   bash launch/tpu_pod.sh delete
#   bash launch/tpu_pod.sh train --dry_run     # print the gcloud commands, run nothing
#
# Storage: the training data is read from a bucket (TFDS reads gs:// directly); the workdir
# (Orbax checkpoints, events, samples) is on a Filestore (NFS) share mounted at the same path on
# every host, because the trainer writes it with local file operations and every host must see
# the same directory. Prepare imagenet2012 once beforehand (`tfds build imagenet2012
# --manual_dir=... --data_dir=$DATA_DIR`, or tests/test_tfds_imagenet.py's steps on a CPU VM).
# Start-up needs no flags: on a pod JAX finds the other hosts from the TPU metadata.

set -euo pipefail

# ------------------------------------------------------------------ EDIT: your project and run
PROJECT=${PROJECT:-my-gcp-project}
ZONE=${ZONE:-us-central2-b}
TPU_NAME=${TPU_NAME:-mvar-pod}
ACCELERATOR=${ACCELERATOR:-v4-32}                  # 4 hosts x 4 chips
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}            # TPU VM software version for that accelerator
SPOT=${SPOT:-true}                                 # spot capacity: cheaper, preemptible
NFS=${NFS:-10.0.0.2:/share}                        # Filestore share (ip:/name) for the workdir
MOUNT=${MOUNT:-/mnt/shared}
DATA_DIR=${DATA_DIR:-gs://my-bucket/tensorflow_datasets}
CONFIG=${CONFIG:-configs/mvar_d16.py}
WORKDIR=${WORKDIR:-$MOUNT/workdirs/mvar_d16}
TOKENIZER=${TOKENIZER:-$MOUNT/weights/mvar_d16}    # converted VQ-VAE dir (python -m mvar_jax.convert)
EXTRA_FLAGS=${EXTRA_FLAGS:-}                       # more --config.x=y overrides
REPO_DIR=mvar-jax                                  # where the code goes in each host's home
# ------------------------------------------------------------------

ACTION=${1:?usage: tpu_pod.sh create|setup|train|sample|delete [--dry_run]}
DRY_RUN=false
[[ "${2:-}" == "--dry_run" ]] && DRY_RUN=true
HERE=$(cd "$(dirname "$0")/.." && pwd)

run() {
  if $DRY_RUN; then printf '%q ' "$@"; echo; else "$@"; fi
}

TPU=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE" --project="$PROJECT")
MAIN="cd ~/$REPO_DIR && python3 main.py --config=$CONFIG --workdir=$WORKDIR"
MAIN+=" --config.tokenizer.checkpoint=$TOKENIZER --config.data.name=imagenet2012"
MAIN+=" --config.data.data_dir=$DATA_DIR${EXTRA_FLAGS:+ $EXTRA_FLAGS}"

case "$ACTION" in
  create)
    SPOT_FLAG=()
    $SPOT && SPOT_FLAG=(--spot)
    run "${TPU[@]}" create "$TPU_NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR" \
        --version="$RUNTIME" "${SPOT_FLAG[@]}"
    ;;
  setup)
    run "${TPU[@]}" scp --recurse "$HERE" "$TPU_NAME:~/$REPO_DIR" --worker=all "${WHERE[@]}"
    run "${TPU[@]}" ssh "$TPU_NAME" --worker=all "${WHERE[@]}" --command="\
sudo apt-get -qq install -y nfs-common && sudo mkdir -p $MOUNT && \
(mountpoint -q $MOUNT || sudo mount -t nfs $NFS $MOUNT) && \
cd ~/$REPO_DIR && pip install -q -r requirements.txt 'jax[tpu]'"
    ;;
  train)
    run "${TPU[@]}" ssh "$TPU_NAME" --worker=all "${WHERE[@]}" --command="$MAIN"
    ;;
  sample)
    run "${TPU[@]}" ssh "$TPU_NAME" --worker=all "${WHERE[@]}" --command="$MAIN --mode=sample"
    ;;
  delete)
    run "${TPU[@]}" delete "$TPU_NAME" "${WHERE[@]}" --quiet
    ;;
  *)
    echo "unknown action $ACTION; use create|setup|train|sample|delete" >&2
    exit 2
    ;;
esac
