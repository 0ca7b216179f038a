#!/usr/bin/env bash
# A/B of two basyn binaries on the local path: the same scenarios as bench/engine.sh's
# local place, on the same kind of data, with A and B taking turns run by run in a
# balanced order (A B B A A B ...), so that a machine whose speed drifts during the call,
# or whose second run of two is the slower, moves both alike. Prints a
# Markdown table of medians (min-max) for docs/benchmarks.md.
#
#   bench/ab.sh A_BINARY B_BINARY [SIZE=2G]
#   env: PAIRS=7 (runs of each binary per scenario)
#        SCENARIOS="S1 S1z S2 S2f S3f PULL"
#        AB_DIR=/var/tmp (where the work directory goes; /dev/shm keeps the disk out)
#
# Data (bench_make_images in bench/lib.sh): the ext4 image of /usr files and its changed
# copy, the source on one ext4 file system and the receiver on another, each on a loop
# device over a file in AB_DIR. Scenarios, each from the receiver as stated (prepared
# untimed before every run):
#   S1   PUSH COPY onto a new file           S1z  PUSH SYNC onto a zeroed (sparse) file
#   S2   PUSH SYNC --no-state onto the old image
#   S2f  PUSH SYNC onto the old image, the receiver's state fresh (`basyn index`)
#   S3f  PUSH SYNC, no change, both states fresh
#   PULL PULL COPY of the source into a new file
# Timed: the command and then `sync RECEIVER`; wall seconds, and the peak RSS of the
# command's largest process (wait4's ru_maxrss; a local endpoint is a thread of it, or
# under --bwlimit a child). `cmp` checks the receiver after every run; a difference
# fails the benchmark. Run it as root on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n '2,25p' "$0" >&2; exit 2; }
A=$(realpath "$1") B=$(realpath "$2") size=${3:-2G}
PAIRS=${PAIRS:-7}
SCENARIOS=${SCENARIOS:-S1 S1z S2 S2f S3f PULL}
for tool in python3 mke2fs mkfs.ext4 losetup cmp tar numfmt; do
  command -v "$tool" >/dev/null || { echo "bench/ab.sh needs $tool" >&2; exit 1; }
done
. bench/lib.sh

work=$(mktemp -d "${AB_DIR:-/var/tmp}/basyn-ab.XXXXXX")
loops=()
cleanup() {
  for d in "$work/tx" "$work/rx"; do mountpoint -q "$d" 2>/dev/null && umount "$d"; done
  for d in "${loops[@]}"; do losetup -d "$d" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

echo "making the $size images in $work ..." >&2
blocks=$(awk -v s="$(numfmt --from=iec "$size")" 'BEGIN { printf "%d", 5000 * s / 2147483648 }')
region=$(awk -v s="$(numfmt --from=iec "$size")" 'BEGIN { r = int(16 * s / 2147483648); print (r < 1 ? 1 : r) }')
bench_make_images "$work" "$size" "$blocks" "$region" >&2
rm -rf "$work/tree"
fs_bytes=$(((size_bytes * 3 + (256 << 20)) >> 20 << 20))
for side in tx rx; do
  mkdir -p "$work/$side"
  truncate -s "$fs_bytes" "$work/fs-$side.img"
  mkfs.ext4 -q -I 256 -E lazy_itable_init=0,lazy_journal_init=0 "$work/fs-$side.img"
  dev=$(losetup --find --show "$work/fs-$side.img")
  loops+=("$dev")
  mount -o noatime "$dev" "$work/$side"
done
SRC=$work/tx/src.img DST=$work/rx/dst.img
cp --sparse=always "$work/src.img" "$SRC"
cp --sparse=always "$work/old.img" "$work/rx/old.img"
cp --sparse=always "$work/src.img" "$work/rx/same.img"
rm -f "$work/src.img" "$work/old.img"

rm_states() { rm -f "$(bench_state_of "$DST")" "$(bench_state_of "$SRC")"; }
prep() {  # prep SCENARIO BINARY: the receiver and states as the scenario starts
  rm -f "$DST"
  rm_states
  case $1 in
    S1 | PULL) ;;
    S1z) truncate -s "$size_bytes" "$DST" ;;
    S2) cp --sparse=always "$work/rx/old.img" "$DST" ;;
    S2f) cp --sparse=always "$work/rx/old.img" "$DST"; "$2" index "$DST" > /dev/null ;;
    S3f) cp --sparse=always "$work/rx/same.img" "$DST"; "$2" index "$SRC" > /dev/null; "$2" index "$DST" > /dev/null ;;
  esac
  sync -f "$DST" 2>/dev/null || sync
  cat "$SRC" > /dev/null
  [ ! -f "$DST" ] || cat "$DST" > /dev/null
}
args() {  # args SCENARIO
  case $1 in
    S1) echo "-l $SRC -r $DST -a push -m copy" ;;
    S2) echo "-l $SRC -r $DST -a push -m sync --no-state" ;;
    S1z | S2f | S3f) echo "-l $SRC -r $DST -a push -m sync" ;;
    PULL) echo "-l $DST -r $SRC -a pull -m copy" ;;
  esac
}
# timed BINARY ARGS...: prints "wall_seconds peak_rss_kib" of the command plus `sync DST`.
timed() {
  python3 - "$DST" "$@" <<'PY'
import os, subprocess, sys, time
dst, cmd = sys.argv[1], sys.argv[2:]
t = time.monotonic()
p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
_, status, ru = os.wait4(p.pid, 0)
subprocess.run(["sync", dst], check=True)
wall = time.monotonic() - t
if os.waitstatus_to_exitcode(status) != 0:
    sys.exit(f"exit {os.waitstatus_to_exitcode(status)}: {' '.join(cmd)}")
print(f"{wall:.3f} {ru.ru_maxrss}")
PY
}
median() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
span() { printf '%s\n' "$@" | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%s-%s", lo, hi }'; }

echo "| scenario | A: time (s) | A: peak RSS (MiB) | B: time (s) | B: peak RSS (MiB) | A ÷ B (median of pairs) |"
echo "|---|---:|---:|---:|---:|---:|"
for scen in $SCENARIOS; do
  read -r -a argv <<< "$(args "$scen")"
  ta=() tb=() ra=() rb=() ratios=()
  for ((i = 0; i < PAIRS; i++)); do
    order="A B"; ((i % 2)) && order="B A"  # A B B A ...: the second of two runs is often slower
    for who in $order; do
      bin=$A; [ "$who" = B ] && bin=$B
      prep "$scen" "$bin"
      read -r wall rss < <(timed "$bin" "${argv[@]}")
      cmp "$SRC" "$DST" ||
        { echo "$scen: $who left the receiver different from the source" >&2; exit 1; }
      if [ "$who" = A ]; then ta+=("$wall"); ra+=("$rss"); else tb+=("$wall"); rb+=("$rss"); fi
    done
    ratios+=("$(awk -v a="${ta[i]}" -v b="${tb[i]}" 'BEGIN { printf "%.3f", a / b }')")
  done
  mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
  echo "| $scen | $(median "${ta[@]}") ($(span "${ta[@]}")) | $(mib "$(median "${ra[@]}")") | $(median "${tb[@]}") ($(span "${tb[@]}")) | $(mib "$(median "${rb[@]}")") | $(median "${ratios[@]}") |"
done
echo
echo "A: $A"
echo "B: $B"
echo "$PAIRS pairs per scenario, $size image, $(date -u +%F), $(nproc) cores"
