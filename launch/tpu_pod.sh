#!/usr/bin/env bash
# Runs `python -m memjax.scan` on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE FLAGFILE [extra scan flags...]
#
# Requirements on the workers: memjax installed (`pip install memjax/` core only:
# no torch needed), the model folder and the prompt table readable at the same
# path on every worker, and WORKDIR on a filesystem every worker shares (NFS,
# Filestore, a gcsfuse mount): each process writes its own shards there and
# process 0 writes the manifest and top-K once all shards exist.
# jax.distributed.initialize() needs no arguments on TPU pods (--distributed).
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE FLAGFILE [extra scan flags...]" >&2
  exit 2
fi
TPU_NAME=$1 ZONE=$2 FLAGFILE=$3
shift 3
EXTRA="$*"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="\
  cd \$HOME/memjax && python3 -m memjax.scan --flagfile=$FLAGFILE --distributed $EXTRA \
  2>&1 | tee -a \$HOME/memjax_scan_\$(hostname).log"
