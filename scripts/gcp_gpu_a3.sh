#!/usr/bin/env bash
# GCP A3 VMs (8 H100 each): one zerojax process per host, all 8 GPUs local to it.
# Host 0 runs the jax.distributed coordinator; every host gets ZEROJAX_* variables.
# The VMs must already exist with zerojax installed (`pip install -e '.[gpu]'`) in ~/zerojax.
#
#   HOSTS="a3-0 a3-1" ZONE=us-central1-a scripts/gcp_gpu_a3.sh [CONFIG] [train args...]
set -euo pipefail
HOSTS=(${HOSTS:?set HOSTS to the VM names, host 0 first})
ZONE="${ZONE:?set ZONE}"
PORT="${PORT:-8476}"
CONFIG="${1:-configs/tiny.json}"
shift || true

COORD_IP=$(gcloud compute instances describe "${HOSTS[0]}" --zone "$ZONE" \
  --format='get(networkInterfaces[0].networkIP)')
N=${#HOSTS[@]}

pids=()
for i in "${!HOSTS[@]}"; do
  gcloud compute ssh "${HOSTS[$i]}" --zone "$ZONE" --command \
    "cd zerojax && ZEROJAX_COORDINATOR=$COORD_IP:$PORT ZEROJAX_NUM_PROCESSES=$N \
     ZEROJAX_PROCESS_ID=$i zerojax train $CONFIG $*" &
  pids+=($!)
done

status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
