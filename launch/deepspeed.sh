#!/usr/bin/env bash
# The DeepSpeed launcher around `bigtrain train`: one node (NUM_GPUS) or many (HOSTFILE).
#
# Usage (arguments are passed straight to `bigtrain train`):
#   NUM_GPUS=8 launch/deepspeed.sh --config my.yaml run_dir=runs/exp1
#   HOSTFILE=launch/hostfile MASTER_ADDR=worker-1 launch/deepspeed.sh --config my.yaml run_dir=/shared/runs/exp1
#
# Environment:
#   NUM_GPUS     ranks per node (--num_gpus; on the CPU accelerator it sets the rank count too)
#                                                     default: unset = every visible accelerator
#   HOSTFILE     DeepSpeed hostfile for multi-node (format: launch/hostfile.example)
#                                                     default: unset = this node only
#   MASTER_ADDR  address of the first host (--master_addr)
#                                                     default: unset = launcher infers it (127.0.0.1 on one node)
#   MASTER_PORT  rendezvous port (--master_port)      default: 29500
#
# Multi-node: the launcher reaches every host in HOSTFILE over passwordless ssh (pdsh), runs this
# same command line there, and forwards only some environment variables (NCCL_*, PYTHON*, ... and
# whatever you list in ~/.deepspeed_env or ./.deepspeed_env, e.g. GLOO_SOCKET_IFNAME, HF_HOME).
# The repo, venv and run_dir must sit at the same paths on every host (shared filesystem).
# Without ssh, use launch/torchrun_multinode.sh (or launch/slurm.sbatch) instead.
# Note: with HOSTFILE unset the launcher still reads /job/hostfile if that file exists.
set -euo pipefail

# --no_local_rank: the launcher would otherwise put --local_rank=N *before* the `train`
# subcommand, where bigtrain's top-level parser rejects it; bigtrain reads LOCAL_RANK from the
# environment, which the launcher always sets.
args=(--no_local_rank --master_port "${MASTER_PORT:-29500}")
if [[ -n "${NUM_GPUS:-}" ]]; then args+=(--num_gpus "${NUM_GPUS}"); fi
if [[ -n "${HOSTFILE:-}" ]]; then args+=(--hostfile "${HOSTFILE}"); fi
if [[ -n "${MASTER_ADDR:-}" ]]; then args+=(--master_addr "${MASTER_ADDR}"); fi

exec deepspeed "${args[@]}" --module bigtrain train "$@"
