#!/usr/bin/env bash
# Nsight Compute on the device: stall reasons and per-instruction samples of our forward and
# backward kernels at one benchmark shape, plus their SASS. Run after device_run.sh build.
#   bash benchmarks/profile.sh 128 8192 0
set -uo pipefail
OUT=${OUT:-/tmp/jax_flash_out}
mkdir -p "$OUT"
d=${1:-128} s=${2:-8192} c=${3:-0}
tag="d${d}_s${s}_c${c}"
ROOT=$(pwd)
cd /tmp
ncu --kernel-name regex:'forward_kernel|backward_kernel_sm80' --launch-count 2 \
  --set full --import-source yes -f -o "$OUT/prof_$tag" \
  python3 "$ROOT/benchmarks/profile_one.py" "$d" "$s" "$c" > "$OUT/ncu_run_$tag.log" 2>&1 || tail -20 "$OUT/ncu_run_$tag.log"
ncu --import "$OUT/prof_$tag.ncu-rep" --page details \
  --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
  --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis > "$OUT/ncu_details_$tag.txt" 2>&1
grep -E "forward_kernel|backward_kernel|Duration|Compute \(SM\) Throughput|Memory Throughput|Issue Slots Busy|Stall|Warp Cycles Per Issued|Registers Per|Achieved Occupancy|Bank" \
  "$OUT/ncu_details_$tag.txt" | cut -c1-150 | head -60
ncu --import "$OUT/prof_$tag.ncu-rep" --page source --csv --print-source sass \
  > "$OUT/ncu_source_$tag.csv" 2>&1
ls -la "$OUT"
