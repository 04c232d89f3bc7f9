"""
Summarise a py-spy raw (collapsed-stack) profile: top frames by self and inclusive time.

    python bench/pyspy_summary.py bench/out/profile.txt [N] [--callers SUBSTRING]

Only the reactor thread is counted (idle worker threads are left out), so the
percentages are shares of the gateway's main-thread CPU.
"""

import collections
import sys


def load(path):
    stacks = []
    for line in open(path):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        frames = stack.split(";")
        if any(f.startswith("Thread._bootstrap") for f in frames[:3]):
            continue
        stacks.append((frames, int(count)))
    return stacks


def main(argv):
    path = argv[0]
    top = int(argv[1]) if len(argv) > 1 and argv[1].isdigit() else 25
    stacks = load(path)
    total = sum(c for _, c in stacks) or 1
    if "--callers" in argv:
        needle = argv[argv.index("--callers") + 1]
        callers = collections.Counter()
        for frames, c in stacks:
            for i, f in enumerate(frames):
                if needle in f:
                    callers[" <- ".join(reversed(frames[max(0, i - 4):i + 1]))] += c
                    break
        for k, c in callers.most_common(top):
            print(f"{100 * c / total:5.1f}%  {k}")
        return
    own, incl = collections.Counter(), collections.Counter()
    for frames, c in stacks:
        own[frames[-1]] += c
        for f in set(frames):
            incl[f] += c
    print(f"{total} samples (reactor thread)")
    print("\nself time:")
    for f, c in own.most_common(top):
        print(f"  {100 * c / total:5.1f}%  {f}")
    print("\ninclusive time (clawproxy and twisted.web frames):")
    shown = 0
    for f, c in incl.most_common():
        if ("clawproxy/" in f or "twisted/web" in f or "prometheus" in f) and shown < top:
            print(f"  {100 * c / total:5.1f}%  {f}")
            shown += 1


if __name__ == "__main__":
    main(sys.argv[1:])
