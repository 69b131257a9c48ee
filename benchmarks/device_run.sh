#!/usr/bin/env bash
# One call on the device machine: build with the CUDA kernels, run the GPU tests, memcheck
# our kernels, and benchmark. Logs and JSON go to $OUT (the device tool returns them).
# Steps are arguments, each optionally with a time limit in seconds (step:seconds):
#   bash benchmarks/device_run.sh build gputests:300 memcheck:120 bench-quick
# Steps: build sass cputests gputests gputests-sm90 gputests-kvcache gputests-multi memcheck
# bench bench-quick bench-ring bench-packed bench-sp bench-grid bench-kvcache kernel-times
# examples. (Spills, serialized wgmma and step costs need no GPU: benchmarks/ptxas_check.sh,
# here.) Kernel variants against the working tree, alternating builds in one call:
# benchmarks/ab_builds.sh.
set -uo pipefail
OUT=${OUT:-/tmp/jax_flash_out}
mkdir -p "$OUT"
# Tests poison every kernel output first (NaN where a kernel forgets to write); benchmarks
# must not pay for that fill, and bench_attention.py turns it off itself.
export PYTHONUNBUFFERED=1 JAX_FLASH_POISON_OUTPUTS=1
PY=${PY:-python3}
ROOT=$(pwd)
log() { echo "== $* ($(date +%T))"; }

run_step() {
  local step=$1 limit=$2
  case "$step" in
    build)
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/device.txt"
      $PY -c "import jax; print('jax', jax.__version__)" | tee -a "$OUT/device.txt"
      local start=$(date +%s) fresh="incremental"
      [ -d build ] || fresh="from scratch"
      CMAKE_BUILD_PARALLEL_LEVEL=16 JAX_FLASH_CUDA=ON timeout "$limit" $PY -m pip install \
        --no-build-isolation --no-deps -v . > "$OUT/build.log" 2>&1 \
        || { grep -E "error|Error" "$OUT/build.log" | head -30; tail -30 "$OUT/build.log"; return 1; }
      echo "build took $(( $(date +%s) - start )) s (16 jobs, $fresh)" | tee -a "$OUT/device.txt"
      (cd /tmp && $PY -c "import jax_flash as jf; print('cuda kernels:', jf.HAS_CUDA_KERNELS)") | tee -a "$OUT/device.txt"
      ;;
    cputests)
      (cd tests && JAX_PLATFORMS=cpu timeout "$limit" $PY -m pytest -q -p no:cacheprovider . 2>&1 | tail -5) | tee "$OUT/cputests.log"
      ;;
    gputests)
      # Several processes share the GPU: compilation, not the GPU, is what these wait on,
      # and autotuning the references' matmuls would only lengthen it.
      (cd tests && XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS=--xla_gpu_autotune_level=0 timeout "$limit" $PY -m pytest -v -n 8 \
        -p no:cacheprovider -p no:benchmark --tb=short -rfE test_gpu.py > "$OUT/gputests.log" 2>&1)
      # Per-test lines stream into the log, so a run cut by its time limit still shows them.
      grep -cE " PASSED " "$OUT/gputests.log" | sed 's/^/passed so far: /'
      grep -E " (FAILED|ERROR) |^E  .*Error|passed|failed" "$OUT/gputests.log" | head -40
      ;;
    sass)
      # The Hopper kernels must run on wgmma: count HGMMA instructions per kernel.
      cuobjdump -sass build/*/libjax_flash_cuda_sm90.a 2>/dev/null > "$OUT/sm90.sass"
      grep -E "Function :" "$OUT/sm90.sass" | head -3
      echo "HGMMA: $(grep -c HGMMA "$OUT/sm90.sass")  HMMA: $(grep -c "HMMA\." "$OUT/sm90.sass")  LDL/STL: $(grep -cE "LDL|STL" "$OUT/sm90.sass")"
      ;;
    gputests-sm90)
      # Smoke first (a hang or a wrong kernel shows in seconds), then the whole grid.
      (cd tests && XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 120 $PY -m pytest -x -q -p no:cacheprovider \
        -p no:benchmark --tb=short test_gpu_sm90.py -k "test_forward and none and bf16" 2>&1 | tail -15) | tee "$OUT/gputests_sm90_smoke.log"
      (cd tests && XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS=--xla_gpu_autotune_level=0 timeout "$limit" $PY -m pytest -v -n 8 \
        -p no:cacheprovider -p no:benchmark --tb=short -rfE test_gpu_sm90.py > "$OUT/gputests_sm90.log" 2>&1)
      grep -cE " PASSED " "$OUT/gputests_sm90.log" | sed 's/^/passed so far: /'
      grep -E " (FAILED|ERROR) |^E  .*Error|passed|failed" "$OUT/gputests_sm90.log" | head -40
      ;;
    gputests-kvcache)
      # flash_attn_with_kvcache's GPU tests, a step of their own (a long list).
      (cd tests && XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS=--xla_gpu_autotune_level=0 timeout "$limit" $PY -m pytest -v -n 8 \
        -p no:cacheprovider -p no:benchmark --tb=short -rfE test_gpu_kvcache.py > "$OUT/gputests_kvcache.log" 2>&1)
      grep -cE " PASSED " "$OUT/gputests_kvcache.log" | sed 's/^/passed so far: /'
      grep -E " (FAILED|ERROR) |^E  .*Error|passed|failed" "$OUT/gputests_kvcache.log" | head -40
      ;;
    memcheck)
      # One process per option group (see gpu_memcheck_driver.py), with XLA's command
      # buffers (CUDA graphs) off: with them the sanitizer's front end segfaulted at random
      # points (both groups of one call, 2026-11-25); without them six of eight group runs
      # that session reached a clean summary and two segfaulted (masks once, masks2 once).
      # Rerun a group that dies; errors found before a crash are in its log.
      for group in ${MEMCHECK_GROUPS:-masks masks2 deterministic dropout kvcache}; do
        (cd tests && XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS=--xla_gpu_enable_command_buffer= \
          timeout "$limit" compute-sanitizer --tool memcheck \
          --print-limit 20 --kernel-name kns=jax_flash $PY gpu_memcheck_driver.py $group > "$OUT/memcheck_$group.log" 2>&1)
        # If the sanitizer's front end dies, its target must not run on beside later steps.
        pkill -f gpu_memcheck_driver.py && echo "killed a leftover memcheck target"
        echo "-- $group"; tail -4 "$OUT/memcheck_$group.log"
      done
      ;;
    bench)
      (cd /tmp && timeout "$limit" $PY "$ROOT/benchmarks/bench_attention.py" --json "$OUT/bench.json") 2>&1 | tee "$OUT/bench.log"
      ;;
    bench-quick)
      (cd /tmp && timeout "$limit" $PY "$ROOT/benchmarks/bench_attention.py" --head-dims 128 --seqlens 2048 8192 \
        --impls jax_flash cudnn --json "$OUT/bench_quick.json") 2>&1 | tee "$OUT/bench_quick.log"
      ;;
    bench-ring)
      # ring_attention on a one-device mesh against the plain op, same run, d128.
      (cd /tmp && timeout "$limit" $PY "$ROOT/benchmarks/bench_attention.py" --head-dims 128 --seqlens 2048 8192 16384 \
        --impls jax_flash ring_1dev cudnn --json "$OUT/bench_ring.json") 2>&1 | tee "$OUT/bench_ring.log"
      ;;
    gputests-multi)
      # Ring and Ulysses across real GPUs (test_gpu_multi.py; skipped below two GPUs).
      (cd tests && XLA_PYTHON_CLIENT_PREALLOCATE=false NCCL_NVLS_ENABLE=0 timeout "$limit" $PY -m pytest -v \
        -p no:cacheprovider -p no:benchmark --tb=short -rfEs test_gpu_multi.py > "$OUT/gputests_multi.log" 2>&1)
      grep -E " (FAILED|ERROR|SKIPPED) |^E  .*Error|passed|failed" "$OUT/gputests_multi.log" | head -40
      ;;
    bench-sp)
      # Sequence parallelism on every GPU of a multi-GPU host (bench_sequence_parallel.py):
      # the one-device check, scaling against one GPU, and the ring's transfers timed apart.
      # SP_ARGS narrows it, e.g. SP_ARGS="--causal 1 --seqlens 32768 131072".
      nvidia-smi topo -m > "$OUT/topology.txt" 2>&1
      (cd /tmp && NCCL_NVLS_ENABLE=0 timeout "$limit" $PY "$ROOT/benchmarks/bench_sequence_parallel.py" ${SP_ARGS:-} \
        --json "$OUT/bench_sp.json") 2>&1 | tee "$OUT/bench_sp.log"
      ;;
    bench-grid)
      # The grid of ../shared/ANCHORS.md (fwd and fwd+bwd) with cuDNN and FlashAttention-3
      # (carried wheel) in the same run, then the sm80 kernels on two points
      # (JAX_FLASH_CUDA_SM90=0; BENCH_SM80=0 skips them). BENCH_GRID="128:2048 16384" and
      # BENCH_MODES=fwd narrow it.
      local spec
      while read -r spec; do
        (cd /tmp && timeout "$limit" $PY "$ROOT/benchmarks/bench_attention.py" --head-dims ${spec%%:*} \
          --seqlens ${spec#*:} --modes ${BENCH_MODES:-fwd fwd_bwd} --impls jax_flash cudnn fa3 \
          --json "$OUT/bench_grid_d${spec%%:*}.json") 2>&1 | grep --line-buffered -E "device|d=" | tee -a "$OUT/bench_grid.log"
      done <<< "${BENCH_GRID:-$'128:1024 2048 4096 8192 16384\n64:2048 8192\n256:2048 8192'}"
      [ "${BENCH_SM80:-1}" = 1 ] || return 0
      (cd /tmp && JAX_FLASH_CUDA_SM90=0 timeout "$limit" $PY "$ROOT/benchmarks/bench_attention.py" --head-dims 128 \
        --seqlens 4096 16384 --modes ${BENCH_MODES:-fwd fwd_bwd} --impls jax_flash --tag _sm80 \
        --json "$OUT/bench_grid_sm80.json") 2>&1 | grep --line-buffered "d=" | tee -a "$OUT/bench_grid.log"
      ;;
    kernel-times)
      # Per-kernel durations of one fwd+bwd call, ours and FA3's (kernel_times.sh, carried
      # FA3 wheel on PYTHONPATH), at KERNEL_TIMES="head_dim:seqlen:causal ...".
      local spec impl d s c
      for spec in ${KERNEL_TIMES:-128:1024:0 128:2048:1 128:16384:0}; do
        IFS=: read -r d s c <<< "$spec"
        for impl in jax_flash fa3; do
          (cd "$ROOT" && timeout "$limit" bash benchmarks/kernel_times.sh "$impl" "$d" "$s" "$c" | head -14)
        done
      done | tee "$OUT/kernel_times.log"
      ;;
    bench-kvcache)
      (cd /tmp && timeout "$limit" $PY "$ROOT/benchmarks/bench_kvcache.py" --json "$OUT/bench_kvcache.json") 2>&1 | tee "$OUT/bench_kvcache.log"
      ;;
    bench-packed)
      (cd /tmp && timeout "$limit" $PY "$ROOT/benchmarks/bench_packed.py" --json "$OUT/bench_packed.json") 2>&1 | tee "$OUT/bench_packed.log"
      ;;
    examples)
      for example in "$ROOT"/examples/*.py; do
        echo "-- $(basename "$example")"
        (cd /tmp && timeout "$limit" $PY "$example" --gpu 2>&1 || timeout "$limit" $PY "$example" 2>&1) | tail -6
      done | tee "$OUT/examples.log"
      ;;
    *) echo "unknown step $step"; return 2 ;;
  esac
}

for arg in "$@"; do
  step=${arg%%:*}
  limit=600
  [[ "$arg" == *:* ]] && limit=${arg##*:}
  log "$step (limit ${limit}s)"
  run_step "$step" "$limit" || echo "!! step $step failed or timed out (rc $?)"
done
log done
