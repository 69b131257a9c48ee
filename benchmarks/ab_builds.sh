#!/usr/bin/env bash
# A/B of kernel variants in one device call: the working tree's build (A) and each variant
# (a patch, or several joined by '+' and applied in that order, to A alone and reverted
# after) built once into a wheel, then AB_ROUNDS
# rounds that install each wheel in turn and time it at the same points, and one table of
# TFLOP/s (mean over rounds, each variant also as a ratio to A) at the end. Installing a
# wheel takes seconds where a rebuild took 11-79 s (2026-12-07: a patch to scores.cuh
# rebuilds every kernel, and so does its revert), so the rounds can alternate freely; the
# spread of A's rounds is the machine's drift, which reached 5% at 1k tokens between two
# builds of one tree (2026-12-06). Run from the project root.
#   AB_VARIANTS="uniform:.try/u.patch staged:.try/t.patch" \
#   AB_POINTS="128:1024 2048:0 1;64:2048:1" bash benchmarks/ab_builds.sh
# AB_POINTS: head_dim:seqlens:causal[:modes[:impls]] groups, ';'-separated; a group without
# modes takes AB_MODES (default "fwd fwd_bwd"), one without impls the round's.
# AB_IMPLS (default jax_flash): bench_attention.py's jax_flash implementations timed in every
# round (jax_flash_wide_window prices the windowed kernels on the plain op's work).
# AB_SECONDS: a time budget for the whole script; no build's round starts once it is spent,
# and the table still prints (a `timeout` around the script would cut the table too, as it
# did on 2026-12-08). Give it the call's limit less what follows the A/B.
# AB_ROUNDS (default 2). AB_PEERS (default cudnn): timed beside A's first round only. The
# build must have run once in this machine's tree (device_run.sh build), or the first build
# is from scratch.
set -uo pipefail
OUT=${OUT:-/tmp/jax_flash_out}
WHEELS=${AB_WHEELS:-/tmp/jax_flash_ab_wheels}  # outside $OUT: the device tool would send them back
# A machine may keep /tmp from an earlier call: its timings must not join this A/B's means.
rm -rf "$OUT/ab" && mkdir -p "$OUT/ab"
ROOT=$(pwd)
PY=${PY:-python3}
START=$(date +%s)
out_of_time() {  # true once AB_SECONDS (if set) have passed since the script started
  [ -n "${AB_SECONDS:-}" ] && [ $(( $(date +%s) - START )) -ge "$AB_SECONDS" ]
}

apply_patch() {  # apply_patch FILE [-R]: the whole patch or nothing (a dry run first)
  patch -p1 -s --batch --dry-run ${2:-} < "$1" > /dev/null &&
    patch -p1 -s --batch --no-backup-if-mismatch ${2:-} < "$1"
}
revert_patches() {  # revert_patches "A.patch+B.patch": each reverted, the last first
  local files i
  [ -n "$1" ] || return 0
  IFS=+ read -ra files <<< "$1"
  for (( i = ${#files[@]} - 1; i >= 0; i-- )); do apply_patch "${files[i]}" -R || return 1; done
}
apply_patches() {  # apply_patches "A.patch+B.patch": each in order, or none of them
  local files file applied=""
  IFS=+ read -ra files <<< "$1"
  for file in "${files[@]}"; do
    apply_patch "$file" || { revert_patches "$applied"; return 1; }
    applied=${applied:+$applied+}$file
  done
}
build() {  # build LABEL: the tree as it stands into $WHEELS/LABEL
  local start=$(date +%s)
  rm -rf "$WHEELS/$1"  # a wheel left by an earlier call would be installed beside this one's
  CMAKE_BUILD_PARALLEL_LEVEL=16 JAX_FLASH_CUDA=ON $PY -m pip wheel --no-build-isolation --no-deps -v \
    -w "$WHEELS/$1" . > "$OUT/ab/build_$1.log" 2>&1 || { grep -E "error" "$OUT/ab/build_$1.log" | head -20; return 1; }
  echo "== $1 built in $(( $(date +%s) - start )) s"
}
bench() {  # bench LABEL ROUND IMPLS...: LABEL's wheel installed, then timed
  local label=$1 round=$2 group d seqlens causal modes impls index=0
  shift 2
  $PY -m pip install --no-deps --no-index --force-reinstall -q "$WHEELS/$label"/*.whl || return 1
  IFS=';' read -ra groups <<< "${AB_POINTS:-128:1024 2048:0 1}"
  for group in "${groups[@]}"; do
    IFS=: read -r d seqlens causal modes impls <<< "$group"
    (cd /tmp && $PY "$ROOT/benchmarks/bench_attention.py" --head-dims $d --seqlens $seqlens \
      --causal $causal --modes ${modes:-${AB_MODES:-fwd fwd_bwd}} --impls ${impls:-$@} \
      --json "$OUT/ab/$label.$round.$index.json") 2>&1 | grep "d=" | sed "s/^/[$label $round] /"
    index=$((index + 1))
  done
}

build A || exit 1
labels="A"
for variant in ${AB_VARIANTS:-}; do
  name=${variant%%:*} file=${variant#*:}
  apply_patches "$file" || { echo "!! $name: the patches do not apply"; continue; }
  build "$name" && labels="$labels $name"
  revert_patches "$file" || { echo "!! $name: the patches do not revert"; exit 1; }
done
for round in $(seq 1 "${AB_ROUNDS:-2}"); do
  for label in $labels; do
    if out_of_time; then
      echo "!! AB_SECONDS spent: round $round stops before $label"
      break 2
    fi
    if [ "$label" = A ] && [ "$round" = 1 ]; then
      bench A 1 ${AB_IMPLS:-jax_flash} ${AB_PEERS-cudnn}
    else
      bench "$label" "$round" ${AB_IMPLS:-jax_flash}
    fi
  done
done
# The installed package must be the tree's again for whatever runs after.
$PY -m pip install --no-deps --no-index --force-reinstall -q "$WHEELS/A"/*.whl

# One row per point: each build's mean over its rounds (jax_flash), A's spread over its
# rounds, each variant's ratio to A, then the peers of A's first round.
$PY - "$OUT/ab" $labels <<'PY' | tee "$OUT/ab_table.txt"
import glob, json, statistics, sys
directory, labels = sys.argv[1], sys.argv[2:]
runs, peers = {}, {}
for label in labels:
    for path in glob.glob(f"{directory}/{label}.*.json"):
        for row in json.load(open(path)):
            if not row.get("tflops"):
                continue
            key = (row["head_dim"], row["seqlen"], row["causal"], row["mode"])
            if row["impl"].startswith("jax_flash"):
                runs.setdefault(key + (row["impl"],), {}).setdefault(label, []).append(row["tflops"])
            else:
                peers.setdefault(key, {})[row["impl"]] = row["tflops"]
variants = labels[1:]
peer_names = sorted({name for values in peers.values() for name in values})
columns = labels + ["A spread"] + [f"{v}/A" for v in variants] + peer_names
print("| point | " + " | ".join(columns) + " |")
print("|---" * (len(columns) + 1) + "|")
for key in sorted(runs):
    d, s, causal, mode, impl = key
    values = runs[key]
    mean = {label: statistics.mean(values[label]) for label in labels if label in values}
    cells = [f"{mean[label]:.1f}" if label in mean else "-" for label in labels]
    a = values.get("A", [])
    cells.append(f"{100 * (max(a) - min(a)) / mean['A']:.1f}%" if len(a) > 1 else "-")
    cells += [f"{mean[v] / mean['A']:.3f}" if v in mean and "A" in mean else "-" for v in variants]
    point_peers = peers.get(key[:4], {})
    cells += [f"{point_peers[name]:.1f}" if name in point_peers else "-" for name in peer_names]
    variant = "" if impl == "jax_flash" else " " + impl[len("jax_flash_"):]
    print(f"| d{d} {s} {'causal ' if causal else ''}{mode}{variant} | " + " | ".join(cells) + " |")
PY
