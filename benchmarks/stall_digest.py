"""A short digest of an Nsight Compute source page (`ncu --page source --csv --print-source
sass`, as profile.sh writes it): the instructions that hold at least a share of the warp
stall samples, in program order, with their execution count and top three stall reasons,
then the totals by reason and by execution count. Synchronization and memory instructions
(HGMMA, barriers, mbarrier waits, TMA, global loads) are listed from a tenth of that share.
    python benchmarks/stall_digest.py ncu_source_jax_flash_d128_s8192_c0.csv [share, 0.004]
The execution count tells a kernel's regions apart without reading the SASS: in the
backward, the consumers' per-step code runs steps x 8 warps times, its masked steps' code
fewer, the per-key-block code (tile start, dK/dV stores) tiles x 8, and the producer's and
reducer's code counts of their own.
"""

import csv
import sys

WATCHED = ("HGMMA", "BAR", "SYNCS", "WARPGROUP", "LDG", "UBLKRED", "UTMA", "EXIT", "WARPSYNC")


def main(path, share=0.004):
    rows = list(csv.reader(open(path)))
    header, data = rows[1], rows[2:]  # rows[0] names the kernel
    source, samples = header.index("Source"), header.index("Warp Stall Sampling (All Samples)")
    executed = header.index("Instructions Executed")
    reasons = [i for i, name in enumerate(header)
               if name.startswith("stall_") and "Not Issued" not in name]
    total = sum(float(row[samples] or 0) for row in data)
    print(f"{total:.0f} samples over {len(data)} instructions")
    for index, row in enumerate(data):
        fraction = float(row[samples] or 0) / total
        watched = any(name in row[source] for name in WATCHED)
        if fraction >= share or (watched and fraction >= share / 10):
            top = sorted(((float(row[i] or 0), header[i][6:]) for i in reasons), reverse=True)[:3]
            top_text = " ".join(f"{name}:{value / total:.1%}" for value, name in top if value > 0)
            print(f"{index:5d} {fraction:6.1%} ex={row[executed]:>8s} {row[source][:70]:70s} {top_text}")
    totals = {header[i][6:]: sum(float(row[i] or 0) for row in data) for i in reasons}
    ranked = sorted(totals.items(), key=lambda item: -item[1])[:10]
    print("by reason:", ", ".join(f"{name} {value / total:.1%}" for name, value in ranked))
    regions = {}
    for row in data:
        count = int((row[executed] or "0").replace(",", ""))
        region = regions.setdefault(count, [0.0, 0])
        region[0] += float(row[samples] or 0)
        region[1] += 1
    print("by execution count:")
    for count, (sampled, instructions) in sorted(regions.items(), key=lambda item: -item[1][0])[:14]:
        print(f"  ex={count:>9d} {sampled / total:6.1%} over {instructions} instructions")


if __name__ == "__main__":
    main(sys.argv[1], *(float(a) for a in sys.argv[2:3]))
