#!/usr/bin/env bash
# Multi-node torchrun around `bigtrain train`: run this once on every node (by hand, pdsh, or
# srun as launch/slurm.sbatch does). Nodes find each other through a c10d rendezvous; no ssh needed.
#
# Usage (identical on every node; arguments are passed straight to `bigtrain train`):
#   NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node1:29500 RDZV_ID=exp1 \
#     launch/torchrun_multinode.sh --config my.yaml --resume auto run_dir=/shared/runs/exp1
#
# Environment:
#   NNODES          number of nodes (or MIN:MAX for elastic)           required
#   RDZV_ENDPOINT   host:port of the rendezvous; one reachable node    required
#   NPROC_PER_NODE  ranks per node (one per GPU)                       default: 1
#   RDZV_ID         job id shared by all nodes of one run; a new id    default: bigtrain
#                   per run stops a stale rendezvous from being joined
#   MAX_RESTARTS    times torchrun restarts the whole worker group     default: 0
#                   after a failure (pair with --resume auto). After a
#                   USR1 the ranks save and exit 143; a group torchrun
#                   restarts then exits at once (BIGTRAIN_STOP_FILE),
#                   and this script exits 143
#
# run_dir must be on a filesystem every node sees (checkpoints are written by all ranks).
# On CPU-only nodes also set GLOO_SOCKET_IFNAME to the interface the nodes share (lo on one host).
set -euo pipefail

: "${NNODES:?set NNODES (number of nodes)}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT (host:port of the rendezvous node)}"

# torchrun in the background, not exec'd: SLURM's warning signal (USR1, forwarded here by srun) must
# reach the ranks, which save a checkpoint and exit. torchrun has no USR1 handler (it would die of it
# and leave the ranks to be killed), so USR1 goes to its children, the ranks; TERM and INT go to
# torchrun, which passes them on to the ranks itself.
# A stop requested by USR1 must also stop the worker groups torchrun starts afterwards (MAX_RESTARTS>0
# counts the ranks' exit 143 as a failure): this node-local file tells `bigtrain train` not to start.
stop_dir="${TMPDIR:-/tmp}"
[[ -d "${stop_dir}" && -w "${stop_dir}" ]] || stop_dir=/tmp  # a TMPDIR exported from the submit host
export BIGTRAIN_STOP_FILE="${BIGTRAIN_STOP_FILE:-${stop_dir}/bigtrain-stop-${RDZV_ID:-bigtrain}-$$}"
rm -f "${BIGTRAIN_STOP_FILE}"
# torchrun ignores USR1 (inherited through exec; the ranks install their own handler): under SLURM the
# step daemon may signal every process of the step, and torchrun, which has no USR1 handler, would die
# of it and leave its ranks to be killed mid-save.
(trap '' USR1; exec torchrun \
  --nnodes "${NNODES}" \
  --nproc_per_node "${NPROC_PER_NODE:-1}" \
  --rdzv_backend c10d \
  --rdzv_endpoint "${RDZV_ENDPOINT}" \
  --rdzv_id "${RDZV_ID:-bigtrain}" \
  --max-restarts "${MAX_RESTARTS:-0}" \
  -m bigtrain train "$@") &
agent=$!
trap 'touch "${BIGTRAIN_STOP_FILE}" 2>/dev/null || true; pkill -USR1 -P "${agent}" || true' USR1
trap 'kill -TERM "${agent}" 2>/dev/null || true' TERM
trap 'kill -INT "${agent}" 2>/dev/null || true' INT
status=0
wait "${agent}" || status=$?
# A trapped signal interrupts wait (status > 128); keep waiting for torchrun's own exit status.
while kill -0 "${agent}" 2>/dev/null; do
  status=0
  wait "${agent}" || status=$?
done
if [[ -e "${BIGTRAIN_STOP_FILE}" ]]; then
  rm -f "${BIGTRAIN_STOP_FILE}"
  # Stopped on request: torchrun reports the ranks' 143 as a failure. A run that finished inside the
  # grace period keeps its 0.
  [[ "${status}" == 0 ]] || status=143
fi
exit "${status}"
