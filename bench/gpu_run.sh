#!/usr/bin/env bash
# Everything bigtrain checks on one CUDA GPU, in one run (docs/gpu.md): the gpu-marked tests, the MFU
# benchmark (llama-1b preset, bf16, seq 2048, ZeRO-2) and the device-to-host snapshot benchmark.
# Results go to $OUT (default ./gpu-out): logs and JSON lines, to be appended to docs/ by hand.
#
#   bash bench/gpu_run.sh            # ~8 minutes on one H200
#   STAGES="tests mfu" bash bench/gpu_run.sh    # some stages only: tests mfu snapshot mfu_ac mfu_mb8 mfu_compile
#
# Python packages the GPU machine lacks can be installed first from wheels in ./.whl (deepspeed,
# datasets, pydantic, ...): WHEELS=1 bash bench/gpu_run.sh. Each stage has its own time limit, so a
# failing stage leaves the others' results.
set -u
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }
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

want tests && timeout 220 python3 -m pytest -q -rA -m gpu tests/test_gpu.py -p no:cacheprovider --durations=0 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
echo "== gpu tests done at $(elapsed)s"

if want mfu; then
  timeout 150 python3 bench/mfu.py --steps 30 --micro-batch 4 --peak-tflops 989 --out "$OUT/mfu.jsonl" > "$OUT/mfu_mb4.log" 2>&1
  tail -3 "$OUT/mfu_mb4.log"
  echo "== mfu (micro-batch 4) done at $(elapsed)s"
fi

# /dev/shm where it can hold two 1e9-parameter snapshots (2 x 14 GB), else the local disk.
if want snapshot; then
shm=$(df --output=avail -B1G /dev/shm 2>/dev/null | tail -1 | tr -d ' ')
dir=/dev/shm/bigtrain-gpu-snapbench
[ "${shm:-0}" -ge 40 ] || dir=/tmp/bigtrain-gpu-snapbench
timeout 140 python3 bench/snapshot_gpu_bench.py --params 1.1e8 1e9 --snapshots 2 --dir "$dir" \
  --out "$OUT/snapshot_gpu_bench.jsonl" > "$OUT/snapshot_gpu_bench.log" 2>&1
echo "snapshot dir: $dir" >> "$OUT/snapshot_gpu_bench.log"
tail -6 "$OUT/snapshot_gpu_bench.log"
echo "== snapshot bench done at $(elapsed)s"
fi

# Only while time is left: a larger micro-batch, with activation checkpointing on (its first GPU run).
if want mfu_ac && [ "$(elapsed)" -lt "${SECOND_MFU_BEFORE:-400}" ]; then
  timeout 140 python3 bench/mfu.py --steps 24 --micro-batch 8 --peak-tflops 989 --out "$OUT/mfu.jsonl" \
    --extra model.activation_checkpointing=true > "$OUT/mfu_mb8_ac.log" 2>&1
  tail -3 "$OUT/mfu_mb8_ac.log"
  echo "== mfu (micro-batch 8, activation checkpointing) done at $(elapsed)s"
fi

# micro-batch 8 without activation checkpointing: the eager reference for the compiled micro-batch 8.
if want mfu_mb8; then
  timeout 150 python3 bench/mfu.py --steps 30 --micro-batch 8 --peak-tflops 989 --out "$OUT/mfu.jsonl" > "$OUT/mfu_mb8.log" 2>&1
  tail -2 "$OUT/mfu_mb8.log"
  echo "== mfu (micro-batch 8) done at $(elapsed)s"
fi

# torch.compile (model.compile=true): micro-batch 4 as above, and 8 without activation checkpointing.
if want mfu_compile; then
  for mb in 4 8; do
    timeout 170 python3 bench/mfu.py --steps 30 --micro-batch $mb --peak-tflops 989 --out "$OUT/mfu.jsonl" \
      --extra model.compile=true > "$OUT/mfu_compile_mb$mb.log" 2>&1
    tail -2 "$OUT/mfu_compile_mb$mb.log"
    echo "== mfu (compiled, micro-batch $mb) done at $(elapsed)s"
  done
fi
