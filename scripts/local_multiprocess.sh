#!/usr/bin/env bash
# Two local processes x 4 CPU devices each = one 8-device jax.distributed job on this machine.
# Usage: scripts/local_multiprocess.sh [CONFIG] [extra `zerojax train` args...]
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:-configs/tiny.json}"
shift || true
exec zerojax launch --nproc 2 --devices-per-process 4 -- zerojax train "$CONFIG" "$@"
