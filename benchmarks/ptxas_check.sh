#!/usr/bin/env bash
# Static checks of the Hopper kernels, no GPU needed: for every sm90 instantiation (or
# those matching GLOB), ptxas's spill bytes and its C7512 warning ("wgmma.mma_async
# instructions are serialized due to insufficient register resources"), which spill
# counts do not show and which put a wait around every wgmma; then the step loop's cost
# from the SASS (benchmarks/step_sass.py) for the backward kernels. Needs nvcc (and
# cuobjdump for the step counts).
#   bash benchmarks/ptxas_check.sh                     # every sm90 instantiation
#   GLOB="backward_sm90_hdim128*" bash benchmarks/ptxas_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
status=0
for source in csrc/cuda/instantiations/${GLOB:-*sm90*}.cu; do
  name=$(basename "$source" .cu)
  log=$(nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Icsrc -cubin "$source" \
        -o "$out/$name.cubin" -Xptxas -v 2>&1) || { echo "$name: build failed"; echo "$log" | grep -m5 error; status=1; continue; }
  serialized=$(grep -c C7512 <<< "$log")
  spills=$(grep -o '[0-9]* bytes spill stores' <<< "$log" | cut -d' ' -f1 | tr '\n' ' ')
  echo "$name: spill stores per kernel: ${spills}; serialized wgmma (C7512): $serialized"
  [ "$serialized" = 0 ] || status=1
  case "$name" in backward*) python3 benchmarks/step_sass.py "$out/$name.cubin" | grep -E "step:|^_Z" | sed 's/^/  /' | cut -c1-150 ;; esac
done
rm -rf "$out"
exit $status
