#!/usr/bin/env bash
# Cloud TPU VM (single host or pod slice): one zerojax process per TPU worker.
# zerojax finds the other workers itself (jax.distributed auto-detection on TPU VMs).
#
#   scripts/gcp_tpu_vm.sh create             # make the TPU VM
#   scripts/gcp_tpu_vm.sh setup              # clone + install zerojax on every worker
#   scripts/gcp_tpu_vm.sh train [ARGS...]    # zerojax train $CONFIG ARGS on every worker
#   scripts/gcp_tpu_vm.sh delete
#
# Settings (environment): NAME, ZONE, TYPE (accelerator type), VERSION (TPU software
# version), REPO (git URL of zerojax), CONFIG.
set -euo pipefail
NAME="${NAME:-zerojax-tpu}"
ZONE="${ZONE:-us-central2-b}"
TYPE="${TYPE:-v4-16}"
VERSION="${VERSION:-tpu-ubuntu2204-base}"
REPO="${REPO:-}"
CONFIG="${CONFIG:-configs/tiny.json}"

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "$1"
}

case "${1:-}" in
  create)
    gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" \
      --accelerator-type "$TYPE" --version "$VERSION" ;;
  setup)
    [ -n "$REPO" ] || { echo "set REPO to the git URL of zerojax" >&2; exit 2; }
    on_all_workers "git clone $REPO zerojax && pip install -U 'jax[tpu]' && pip install -e zerojax" ;;
  train)
    shift
    on_all_workers "cd zerojax && zerojax train $CONFIG $*" ;;
  delete)
    gcloud compute tpus tpu-vm delete "$NAME" --zone "$ZONE" --quiet ;;
  *)
    echo "usage: $0 create|setup|train [ARGS...]|delete" >&2; exit 2 ;;
esac
