#!/usr/bin/env bash
# Nsight Compute on the device: the duration of every kernel of one forward+backward call
# (profile_one.py) at one benchmark shape, summed by kernel name, so that the main kernels'
# share can be told from the memory-bound ones around them (preprocess, dQ conversion, XLA's
# own). Caches and clocks are left as they are; each kernel still runs alone, so the sum
# is not the call's wall time. Run after device_run.sh build; FA3 needs the carried wheel
# on PYTHONPATH.
#   bash benchmarks/kernel_times.sh IMPL HEAD_DIM SEQLEN CAUSAL
#   bash benchmarks/kernel_times.sh jax_flash 128 1024 0
set -uo pipefail
OUT=${OUT:-/tmp/jax_flash_out}
mkdir -p "$OUT"
impl=${1:-jax_flash} d=${2:-128} s=${3:-1024} c=${4:-0}
tag="${impl}_d${d}_s${s}_c${c}"
ROOT=$(pwd)
cd /tmp
ncu --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv \
  python3 "$ROOT/benchmarks/profile_one.py" "$impl" "$d" "$s" "$c" > "$OUT/kernel_times_$tag.csv" 2>&1 \
  || { tail -20 "$OUT/kernel_times_$tag.csv"; exit 1; }
python3 - "$OUT/kernel_times_$tag.csv" "$tag" <<'PY'
import collections, csv, sys

# ncu prints its own lines and the program's before the CSV table: start at its header.
lines = open(sys.argv[1]).read().splitlines()
start = next(i for i, line in enumerate(lines) if line.startswith('"ID"'))
rows = list(csv.DictReader(lines[start:]))
scale = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "ns": 1e-3, "us": 1.0, "ms": 1e3}
totals, counts = collections.defaultdict(float), collections.Counter()
for row in rows:
    if row.get("Metric Name") != "gpu__time_duration.sum":
        continue
    name = row["Kernel Name"][:90]
    totals[name] += float(row["Metric Value"].replace(",", "")) * scale.get(row["Metric Unit"], 1.0)
    counts[name] += 1
print(f"== {sys.argv[2]}: kernel durations (us), largest first")
for name, total in sorted(totals.items(), key=lambda item: -item[1]):
    print(f"{total:10.1f}  x{counts[name]:<3d} {name}")
print(f"{sum(totals.values()):10.1f}  total")
PY
