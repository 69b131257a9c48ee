"""How long the busiest SM works, against the mean, for the Hopper backward's tile orders
under a causal mask at head dim 128 (128-key tiles, 64-query steps, batch x seqlen = 16k
tokens, 16 heads), counted in steps and with nothing but steps costing time:
- paired: the persistent order (units of key blocks i and n-1-i, taken round robin);
- longest first: each key block handed to whichever SM frees first, in the order of
  candidates Q and QC (LongestFirstOrder in their patches: heads in sections of about 256
  tiles, index-major inside one).
The prediction behind those candidates (benchmarks/candidates/README.md).
    python benchmarks/tail_sim.py [sms, 132]
"""

import heapq
import sys


def causal_steps(seqlen, block_n=128, block_m=64):
    """Steps of each key block of one head (key block j sees queries from block_n * j)."""
    return [(seqlen - block_n * j) // block_m for j in range(seqlen // block_n)]


def paired_makespan(steps, heads, sms):
    blocks = len(steps)
    units = (heads // 2) * blocks
    loads = [0] * sms
    for unit in range(units):
        within = unit % blocks
        loads[unit % sms] += steps[within] + steps[blocks - 1 - within]
    return max(loads)


def longest_first_makespan(steps, heads, sms, section_tiles=256):
    blocks = len(steps)
    section = min(heads, -(-section_tiles // blocks))
    order = []
    for first in range(0, heads, section):
        size = min(section, heads - first)
        order += [steps[index] for index in range(blocks) for _ in range(size)]
    free_at = [0] * sms
    heapq.heapify(free_at)
    for work in order:
        heapq.heappush(free_at, heapq.heappop(free_at) + work)
    return max(free_at)


def main(sms=132):
    for seqlen in (1024, 2048, 4096, 8192, 16384):
        heads = 16 * (16384 // seqlen)  # (batch, head) pairs
        steps = causal_steps(seqlen)
        mean = sum(steps) * heads / sms
        paired = paired_makespan(steps, heads, sms)
        longest = longest_first_makespan(steps, heads, sms)
        print(f"seqlen {seqlen:5d}: mean {mean:7.1f} steps, paired {paired / mean - 1:+.1%}, "
              f"longest first {longest / mean - 1:+.1%}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))
