#!/usr/bin/env bash
# One node, one entry point: `bigtrain train` (plain python for one process, torchrun for more).
#
# Usage (from anywhere; arguments are passed straight to `bigtrain train`):
#   launch/local.sh [--config FILE] [--resume auto|PATH] [dotted.key=value ...]
#   NPROC=8 launch/local.sh --config my.yaml run_dir=runs/exp1 train.steps=1000
#
# Environment:
#   NPROC   processes (one per GPU; on CPU, ranks share the cores)          default: 1
#   PYTHON  interpreter used when NPROC=1                                   default: python
#
# `python`, `torchrun` and bigtrain must be on PATH (activate the venv first). On a CPU-only box with
# several ranks also set GLOO_SOCKET_IFNAME=lo so gloo binds to loopback.
set -euo pipefail

NPROC="${NPROC:-1}"
PYTHON="${PYTHON:-python}"

if (( NPROC > 1 )); then
  # --standalone: a private c10d rendezvous on a free local port, so parallel runs do not collide.
  exec torchrun --standalone --nproc_per_node "${NPROC}" -m bigtrain train "$@"
else
  exec "${PYTHON}" -m bigtrain train "$@"
fi
