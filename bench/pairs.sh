#!/usr/bin/env bash
# Paired timing of two commands: A and B take turns N times (A B A B ...), so that a
# machine whose speed drifts moves both alike. Prints the median wall seconds (min-max) of
# each and the median of the per-pair ratios A / B.
#
#   bench/pairs.sh N 'COMMAND A' 'COMMAND B'
# Each command is run by sh -c, its output thrown away; a failing run stops the script.
set -euo pipefail
[ $# -eq 3 ] || { sed -n '2,8p' "$0" >&2; exit 2; }
python3 - "$@" <<'PY'
import statistics, subprocess, sys, time
n, a, b = int(sys.argv[1]), sys.argv[2], sys.argv[3]
def run(cmd):
    t = time.monotonic()
    subprocess.run(["sh", "-c", cmd], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - t
run(a); run(b)  # warm-up, not counted
ta, tb = [], []
for _ in range(n):
    ta.append(run(a)); tb.append(run(b))
show = lambda v: f"{statistics.median(v):.3f} ({min(v):.3f}-{max(v):.3f})"
print(f"A {show(ta)}\nB {show(tb)}\nA/B {statistics.median(x / y for x, y in zip(ta, tb)):.3f} ({n} pairs)")
PY
