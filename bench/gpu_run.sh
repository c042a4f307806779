#!/usr/bin/env bash
# Everything bigtrain checks on one CUDA GPU, in one run (docs/gpu.md): the gpu-marked tests, the MFU
# benchmark (llama-1b preset, bf16, seq 2048, ZeRO-2) and the device-to-host snapshot benchmark.
# Results go to $OUT (default ./gpu-out): logs, JSON lines and stages.txt (each stage's exit status),
# to be appended to docs/ by hand. Exits non-zero when a stage failed.
#
#   bash bench/gpu_run.sh            # all stages: ~12 minutes on one H200, at most ~24 (the limits)
#   STAGES="tests mfu" bash bench/gpu_run.sh    # some stages: tests mfu snapshot mfu_ac mfu_mb8 mfu_compile
#
# Python packages the GPU machine lacks can be installed first from wheels in ./.whl (deepspeed,
# datasets, pydantic, ...): WHEELS=1 bash bench/gpu_run.sh. Each stage has its own time limit (and is
# killed 30 s after it, since bigtrain answers SIGTERM by saving a checkpoint), so a failing stage
# leaves the others' results.
set -u -o pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }
failed=0
# run NAME SECONDS LOG CMD...: one stage, its exit status recorded in $OUT/stages.txt
run() {
  local name=$1 limit=$2 log=$3 rc=0
  shift 3
  timeout -k 30 "$limit" "$@" > "$OUT/$log" 2>&1 || rc=$?
  echo "$name rc=$rc at $(elapsed)s" | tee -a "$OUT/stages.txt"
  tail -3 "$OUT/$log"
  [ "$rc" = 0 ] || failed=1
}
if [ "${WHEELS:-0}" = 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import sys, torch, deepspeed, transformers, datasets; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__, 'datasets', datasets.__version__)"
  df -h /dev/shm /tmp | tail -2
  grep -E "MemTotal|MemAvailable" /proc/meminfo
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
echo "== setup done at $(elapsed)s"
STAGES=${STAGES:-tests mfu snapshot mfu_ac mfu_mb8 mfu_compile}
want() { case " $STAGES " in *" $1 "*) return 0;; esac; return 1; }
mfu=(python3 bench/mfu.py --peak-tflops 989 --out "$OUT/mfu.jsonl")

want tests && run tests 220 gpu_tests.log \
  python3 -m pytest -q -rA -m gpu tests/test_gpu.py -p no:cacheprovider --durations=0
want mfu && run mfu_mb4 150 mfu_mb4.log "${mfu[@]}" --steps 30 --micro-batch 4
if want snapshot; then
  # /dev/shm where it can hold two 1e9-parameter snapshots (2 x 14 GB), else the local disk.
  shm=$(df --output=avail -B1G /dev/shm 2>/dev/null | tail -1 | tr -d ' ')
  dir=/dev/shm/bigtrain-gpu-snapbench
  [ "${shm:-0}" -ge 40 ] || dir=/tmp/bigtrain-gpu-snapbench
  echo "snapshot dir: $dir" >> "$OUT/stages.txt"
  run snapshot 140 snapshot_gpu_bench.log \
    python3 bench/snapshot_gpu_bench.py --params 1.1e8 1e9 --snapshots 2 --dir "$dir" --out "$OUT/snapshot_gpu_bench.jsonl"
fi
# A larger micro-batch with activation checkpointing, and without (the eager reference for compile).
want mfu_ac && run mfu_mb8_ac 140 mfu_mb8_ac.log "${mfu[@]}" --steps 24 --micro-batch 8 --extra model.activation_checkpointing=true
want mfu_mb8 && run mfu_mb8 150 mfu_mb8.log "${mfu[@]}" --steps 30 --micro-batch 8
# model.compile=true (each decoder layer torch.compiled): micro-batch 4 and 8, and 8 with checkpointing.
if want mfu_compile; then
  run mfu_compile_mb4 170 mfu_compile_mb4.log "${mfu[@]}" --steps 30 --micro-batch 4 --extra model.compile=true
  run mfu_compile_mb8 170 mfu_compile_mb8.log "${mfu[@]}" --steps 30 --micro-batch 8 --extra model.compile=true
  run mfu_compile_mb8_ac 170 mfu_compile_mb8_ac.log "${mfu[@]}" --steps 30 --micro-batch 8 \
    --extra model.compile=true model.activation_checkpointing=true
fi
exit "$failed"
