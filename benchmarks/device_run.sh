#!/usr/bin/env bash
# One call on the device machine: build with the CUDA kernels, run the CPU and GPU tests,
# memcheck our kernels, and benchmark. Logs and JSON go to $OUT (the device tool returns
# them). Steps to run are arguments: build cputests gputests memcheck bench bench-quick.
#   bash benchmarks/device_run.sh build gputests memcheck bench
set -uo pipefail
OUT=${OUT:-/tmp/jax_flash_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 JAX_FLASH_POISON_OUTPUTS=1
PY=python3
log() { echo "== $* ($(date +%T))"; }

for step in "$@"; do
  case "$step" in
    build)
      log build
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
      $PY -c "import jax; print('jax', jax.__version__)" | tee -a "$OUT/device.txt"
      start=$(date +%s)
      CMAKE_BUILD_PARALLEL_LEVEL=16 JAX_FLASH_CUDA=ON $PY -m pip install --no-build-isolation --no-deps \
        -v . > "$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
      echo "build took $(( $(date +%s) - start )) s" | tee -a "$OUT/device.txt"
      (cd /tmp && $PY -c "import jax_flash as jf; print('cuda kernels:', jf.HAS_CUDA_KERNELS)") | tee -a "$OUT/device.txt"
      ;;
    cputests)
      log "CPU tests (jax on CPU)"
      (cd tests && JAX_PLATFORMS=cpu $PY -m pytest -q -x -p no:cacheprovider . 2>&1 | tail -5) | tee "$OUT/cputests.log"
      ;;
    gputests)
      log "GPU tests"
      (cd tests && $PY -m pytest -q -p no:cacheprovider test_gpu.py 2>&1 | tail -40) | tee "$OUT/gputests.log"
      ;;
    memcheck)
      log memcheck
      (cd tests && XLA_PYTHON_CLIENT_PREALLOCATE=false compute-sanitizer --tool memcheck --print-limit 20 $PY gpu_memcheck_driver.py 2>&1 | tail -25) | tee "$OUT/memcheck.log"
      ;;
    bench)
      log bench
      (cd /tmp && $PY "$OLDPWD/benchmarks/bench_attention.py" --json "$OUT/bench.json") 2>&1 | tee "$OUT/bench.log"
      ;;
    bench-quick)
      log bench-quick
      (cd /tmp && $PY "$OLDPWD/benchmarks/bench_attention.py" --head-dims 128 --seqlens 2048 8192 \
        --json "$OUT/bench_quick.json") 2>&1 | tee "$OUT/bench_quick.log"
      ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
