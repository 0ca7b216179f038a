#!/usr/bin/env bash
# Benchmark: basyn against dd|ssh and rsync on the same data, in the same run, over ssh
# on 127.0.0.1 (a private sshd started here). Prints a Markdown table for
# docs/benchmarks.md. Needs root (sshd), openssh-server, rsync, /usr/bin/time.
#
#   bench/run.sh [SIZE_MIB=2048] [CHANGED_PERCENT=1]
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-2048}
pct=${2:-1}
for tool in rsync /usr/bin/time /usr/sbin/sshd python3; do
  command -v "$tool" >/dev/null || { echo "bench needs $tool" >&2; exit 1; }
done
cargo build --release --quiet
basyn="$PWD/target/release/basyn"
work=$(mktemp -d /var/tmp/basyn-bench.XXXXXX)
cleanup() { [ -f "$work/sshd.pid" ] && kill "$(cat "$work/sshd.pid")" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

# --- a private sshd on a free loopback port (host "benchhost"; sets ssh_cmd)
. bench/lib.sh
bench_sshd "$work"

# --- data: a random image, and the same image with PCT% scattered 4 KiB blocks changed
echo "preparing ${size_mib} MiB images in $work ..." >&2
head -c "${size_mib}M" /dev/urandom > "$work/old.img"
cp "$work/old.img" "$work/src.img"
python3 - "$work/src.img" "$size_mib" "$pct" <<'PY'
import os, random, sys
path, size_mib, pct = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
blocks = size_mib * 256
rng = random.Random(42)
picked = rng.sample(range(blocks), int(blocks * pct / 100))
with open(path, "r+b") as f:
    for b in picked:
        f.seek(b * 4096)
        f.write(os.urandom(4096))
print(f"changed {len(picked)} blocks of 4 KiB", file=sys.stderr)
PY
sync

rows=()
# run NAME -- COMMAND...: times COMMAND, checks dst.img == src.img afterwards
run() {
  local name=$1; shift
  sync
  /usr/bin/time -f '%e %M' -o "$work/time" "$@" > "$work/out" 2> "$work/err" || { cat "$work/err" >&2; exit 1; }
  read -r secs rss < "$work/time"
  local bytes reads
  bytes=$(grep -oP 'Both \K[0-9]+' "$work/out" 2>/dev/null || grep -oP 'Total bytes (sent|received): \K[0-9,]+' "$work/out" | tr -d , | paste -sd+ | bc 2>/dev/null || echo "-")
  reads=$(grep -oP 'Read: +\Klocal [0-9]+ bytes, remote [0-9]+ bytes' "$work/out" 2>/dev/null || echo "-")
  [ -z "$bytes" ] && bytes="-"
  if ! cmp -s "$work/src.img" "$work/dst.img"; then echo "$name: receiver differs from source!" >&2; exit 1; fi
  rows+=("| $name | $secs | $bytes | $reads | $((rss / 1024)) |")
  echo "$name: ${secs}s, $bytes bytes, reads: $reads, $((rss / 1024)) MiB max RSS" >&2
}
# The receiver as it was before the change, with a fresh state (untimed), and no state
# for the changed source: the usual nightly situation.
old_receiver() {
  cp "$work/old.img" "$work/dst.img"
  rm -f "$(bench_state_of "$work/src.img")"
  "$basyn" index "$work/dst.img" "$@" >/dev/null
}
B=("$basyn" -l "$work/src.img" -r "$work/dst.img" -h benchhost --stat)

rm -f "$work/dst.img"
run "dd \| ssh, full copy (conv=fdatasync)" \
  sh -c "dd if='$work/src.img' bs=4M status=none | $ssh_cmd benchhost \"dd of='$work/dst.img' bs=4M conv=fdatasync status=none\""
rm -f "$work/dst.img"
run "basyn COPY, initial (zstd-3, --no-state)" "${B[@]}" -a push -m copy --no-state
rm -f "$(bench_state_of "$work/dst.img")" "$(bench_state_of "$work/src.img")" "$work/dst.img"
run "basyn COPY, initial (builds both states)" "${B[@]}" -a push -m copy
cp "$work/old.img" "$work/dst.img"
run "rsync --inplace --no-whole-file, changed" \
  rsync -e "$ssh_cmd" --inplace --no-whole-file --stats "$work/src.img" "benchhost:$work/dst.img"
cp "$work/old.img" "$work/dst.img"
run "basyn SYNC, changed, --no-state (reads both)" "${B[@]}" -a push -m sync --no-state
old_receiver
run "basyn SYNC, changed (receiver state fresh)" "${B[@]}" -a push -m sync
old_receiver --chunk 4
run "basyn SYNC --chunk 4, changed (receiver state fresh)" "${B[@]}" -a push -m sync --chunk 4
run "basyn SYNC, unchanged (both states fresh)" "${B[@]}" -a push -m sync --chunk 4
run "basyn --recheck, no action (both states fresh)" "${B[@]}" --recheck --chunk 4
run "basyn --recheck --no-state (reads both)" "${B[@]}" --recheck --no-state
old_receiver
run "basyn SYNC, changed, local (no ssh)" "$basyn" -l "$work/src.img" -r "$work/dst.img" -a push -m sync --stat

echo
echo "$(date -u +%Y-%m-%d), ${size_mib} MiB random image, ${pct}% scattered 4 KiB blocks changed, $(nproc) cores, ssh on 127.0.0.1, page cache warm"
echo
echo "| run | time (s) | bytes on the wire | device reads | max RSS (MiB) |"
echo "|---|---:|---:|---|---:|"
printf '%s\n' "${rows[@]}"
