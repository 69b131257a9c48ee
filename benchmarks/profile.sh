#!/usr/bin/env bash
# Nsight Compute on the device: one kernel of one implementation at one benchmark shape, its
# speed-of-light, pipe, warp-state and memory sections, and per-instruction stall samples
# (SASS with source). Run after device_run.sh build; clocks are left as the card has them.
#   bash benchmarks/profile.sh IMPL HEAD_DIM SEQLEN CAUSAL KERNEL_REGEX
#   bash benchmarks/profile.sh jax_flash 128 8192 0 backward_kernel_sm90
#   bash benchmarks/profile.sh fa3 128 8192 0 FlashAttnBwdSm90      (carried wheel on PYTHONPATH)
set -uo pipefail
OUT=${OUT:-/tmp/jax_flash_out}
mkdir -p "$OUT"
impl=${1:-jax_flash} d=${2:-128} s=${3:-8192} c=${4:-0} kernel=${5:-backward_kernel_sm90}
tag="${impl}_d${d}_s${s}_c${c}"
ROOT=$(pwd)
report=/tmp/prof_$tag
cd /tmp
ncu --clock-control none --kernel-name-base demangled --kernel-name regex:"$kernel" --launch-count 1 \
  --set full --import-source yes -f -o "$report" \
  python3 "$ROOT/benchmarks/profile_one.py" "$impl" "$d" "$s" "$c" > "$OUT/ncu_run_$tag.log" 2>&1 \
  || tail -20 "$OUT/ncu_run_$tag.log"
ncu --import "$report.ncu-rep" --page details > "$OUT/ncu_details_$tag.txt" 2>&1
grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Issue Slots Busy|Warp Cycles Per Issued|Registers Per|Shared Memory Configuration Size|L2 Hit Rate|Bank" \
  "$OUT/ncu_details_$tag.txt" | cut -c1-120 | head -20
# Pipe utilization and stall reasons as raw metrics (names vary between ncu versions: grep).
ncu --import "$report.ncu-rep" --page raw --csv 2>/dev/null | python3 -c '
import csv, sys
rows = list(csv.reader(sys.stdin))
names, units, values = rows[0], rows[1], rows[2]
for n, u, v in zip(names, units, values):
    if any(key in n for key in ("pipe_tensor", "gmma", "warp_issue_stalled", "data_pipe_lsu_wavefronts_mem_shared", "cycles_elapsed.avg", "inst_executed.sum")):
        if "pct" in n or "ratio" in n or n.endswith(".sum") or n.endswith(".avg"):
            print(f"{n:90s} {v:>14s} {u}")
' > "$OUT/ncu_raw_$tag.txt"
grep -E "pipe_tensor.*pct|gmma.*pct" "$OUT/ncu_raw_$tag.txt" | head -8
# Per-instruction samples, and a digest of where they stall (stall_digest.py).
ncu --import "$report.ncu-rep" --page source --csv --print-source sass > "$OUT/ncu_source_$tag.csv" 2>&1
python3 "$ROOT/benchmarks/stall_digest.py" "$OUT/ncu_source_$tag.csv" > "$OUT/ncu_stalls_$tag.txt" \
  && tail -1 "$OUT/ncu_stalls_$tag.txt"
