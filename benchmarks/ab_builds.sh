#!/usr/bin/env bash
# A/B of kernel variants in one device call: the working tree's build (A), then each
# variant (a patch, applied to A alone and reverted after), then A again, each timed at the
# same points, and one table of TFLOP/s at the end. Rebuilds are incremental (8-16 s on the
# H100 machine); alternating with A shows the machine's drift, which reached 5% at 1k tokens
# between two builds of one tree (2026-12-06). Run from the project root.
#   AB_VARIANTS="uniform:.try/u.patch staged:.try/t.patch" \
#   AB_POINTS="128:1024 2048:0 1;64:2048:1" bash benchmarks/ab_builds.sh
# AB_POINTS: head_dim:seqlens:causal groups, ';'-separated. AB_MODES (default "fwd fwd_bwd").
# AB_PEERS (default cudnn): timed beside A's first round only. The build must have run
# once in this machine's tree (device_run.sh build), or the first build is from scratch.
set -uo pipefail
OUT=${OUT:-/tmp/jax_flash_out}
mkdir -p "$OUT/ab"
ROOT=$(pwd)
PY=${PY:-python3}

apply_patch() {  # apply_patch FILE [-R]: the whole patch or nothing (a dry run first)
  patch -p1 -s --batch --dry-run ${2:-} < "$1" > /dev/null &&
    patch -p1 -s --batch --no-backup-if-mismatch ${2:-} < "$1"
}
build() {
  local start=$(date +%s)
  CMAKE_BUILD_PARALLEL_LEVEL=16 JAX_FLASH_CUDA=ON $PY -m pip install --no-build-isolation --no-deps -v . \
    > "$OUT/ab/build_$1.log" 2>&1 || { grep -E "error" "$OUT/ab/build_$1.log" | head -20; return 1; }
  echo "== $1 built in $(( $(date +%s) - start )) s"
}
bench() {  # bench LABEL IMPLS...
  local label=$1 group d seqlens causal index=0
  shift
  IFS=';' read -ra groups <<< "${AB_POINTS:-128:1024 2048:0 1}"
  for group in "${groups[@]}"; do
    IFS=: read -r d seqlens causal <<< "$group"
    (cd /tmp && $PY "$ROOT/benchmarks/bench_attention.py" --head-dims $d --seqlens $seqlens \
      --causal $causal --modes ${AB_MODES:-fwd fwd_bwd} --impls "$@" \
      --json "$OUT/ab/$label.$index.json") 2>&1 | grep "d=" | sed "s/^/[$label] /"
    index=$((index + 1))
  done
}

build A || exit 1
bench A jax_flash ${AB_PEERS-cudnn}
labels="A"
for variant in ${AB_VARIANTS:-}; do
  name=${variant%%:*} file=${variant#*:}
  apply_patch "$file" || { echo "!! $name: the patch does not apply"; continue; }
  build "$name" && bench "$name" jax_flash && labels="$labels $name"
  apply_patch "$file" -R || { echo "!! $name: the patch does not revert"; exit 1; }
done
build A2 && bench A2 jax_flash && labels="$labels A2"

# One row per point, one column per build (jax_flash), then the peers of A's round.
$PY - "$OUT/ab" $labels <<'PY' | tee "$OUT/ab_table.txt"
import glob, json, sys
directory, labels = sys.argv[1], sys.argv[2:]
table, peers = {}, set()
for label in labels:
    for path in glob.glob(f"{directory}/{label}.*.json"):
        for row in json.load(open(path)):
            key = (row["head_dim"], row["seqlen"], row["causal"], row["mode"])
            column = label if row["impl"] == "jax_flash" else row["impl"]
            if column != label:
                peers.add(column)
            table.setdefault(key, {})[column] = row.get("tflops")
columns = labels + sorted(peers)
print("| point | " + " | ".join(columns) + " |")
print("|---" * (len(columns) + 1) + "|")
for (d, s, causal, mode), values in sorted(table.items()):
    cells = [f"{values[c]:.1f}" if values.get(c) else "-" for c in columns]
    print(f"| d{d} {s} {'causal ' if causal else ''}{mode} | " + " | ".join(cells) + " |")
PY
