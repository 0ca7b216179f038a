#!/usr/bin/env bash
# Benchmark of `SYNC --since` (issue 13): a nightly sync of tonight's thin snapshot,
# with and without --since last night's, on the same data in the same run. Prints a
# Markdown table for docs/benchmarks.md.
#
#   bench/since.sh [SIZE_GIB=2] [CHANGED_PERCENT=1]
#   env: RUNS=3 (timed runs per row)  BASYN=PATH (default: target/release/basyn, built)
#
# Run it as root (it drops the page cache before each timed run, so that the source is
# read from the disk). Data: last.img of SIZE_GIB random bytes; tonight.img the same
# with CHANGED_PERCENT% of its 64 KiB pool blocks changed (seeded). A real pool metadata
# file maps both (made with thin_restore from thin-provisioning-tools), and thin_delta's
# XML between them goes to --changed-ranges. Before each timed run the receiver is
# synced from last.img again (untimed), so its state and last.img's are fresh, and
# tonight's state is removed: each run is the first sync of tonight's snapshot.
set -euo pipefail
cd "$(dirname "$0")/.."
size_gib=${1:-2}
percent=${2:-1}
runs=${RUNS:-3}
if [ -z "${BASYN:-}" ]; then
  nice -n 10 cargo build --release --quiet
  BASYN=target/release/basyn
fi
for tool in thin_restore thin_delta python3; do
  command -v "$tool" >/dev/null || { echo "bench/since.sh needs $tool (apt-get install thin-provisioning-tools)" >&2; exit 1; }
done
work=$(mktemp -d /var/tmp/basyn-since.XXXXXX)
trap 'rm -rf "$work"' EXIT
export BASYN_STATE_DIR=$work/states

python3 - "$work" "$size_gib" "$percent" <<'PY'
import os, random, sys
work, gib, percent = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
block = 64 * 1024
blocks = gib * (1 << 30) // block
rng = random.Random(13)
with open(f"{work}/last.img", "wb") as f:
    for _ in range(gib * 1024):
        f.write(rng.randbytes(1 << 20))
changed = sorted(rng.sample(range(blocks), int(blocks * percent / 100)))
os.system(f"cp {work}/last.img {work}/tonight.img")
with open(f"{work}/tonight.img", "r+b") as f:
    for b in changed:
        f.seek(b * block + rng.randrange(block - 64))
        f.write(rng.randbytes(64))
new = {b: blocks + k for k, b in enumerate(changed)}
with open(f"{work}/pool.xml", "w") as x:
    x.write(f'<superblock uuid="" time="1" transaction="2" flags="0" version="2" data_block_size="128" nr_data_blocks="{2 * blocks}">\n')
    x.write(f'<device dev_id="1" mapped_blocks="{blocks}" transaction="0" creation_time="0" snap_time="1">\n')
    x.write(f'<range_mapping origin_begin="0" data_begin="0" length="{blocks}" time="0"/>\n</device>\n')
    x.write(f'<device dev_id="2" mapped_blocks="{blocks}" transaction="1" creation_time="1" snap_time="1">\n')
    for b in range(blocks):
        x.write(f'<single_mapping origin_block="{b}" data_block="{new.get(b, b)}" time="{int(b in new)}"/>\n')
    x.write("</device>\n</superblock>\n")
print(f"{len(changed)} of {blocks} blocks of 64 KiB changed", file=sys.stderr)
PY
truncate -s 256M "$work/meta.bin"
thin_restore -q -i "$work/pool.xml" -o "$work/meta.bin"
thin_delta --snap1 1 --snap2 2 "$work/meta.bin" > "$work/delta.xml"
rm "$work/pool.xml"

reset() {
  "$BASYN" -l "$work/last.img" -r "$work/backup.img" -a push -m sync >/dev/null
  rm -f "$BASYN_STATE_DIR"/*tonight.img.basyn-state
  sync
  echo 3 > /proc/sys/vm/drop_caches
}

# row NAME ARGS...: RUNS timed runs; prints the median time, and bytes read of the source.
row() {
  local name=$1 times=() read=0 t
  shift
  for _ in $(seq "$runs"); do
    reset
    t0=$(date +%s%N)
    "$BASYN" -l "$work/tonight.img" -r "$work/backup.img" -a push -m sync --stat=json "$@" > "$work/stat.json"
    t=$(( ($(date +%s%N) - t0) / 1000000 ))
    times+=("$t")
    read=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["local_read_bytes"])' "$work/stat.json")
    cmp -s "$work/tonight.img" "$work/backup.img" || { echo "$name: the receiver differs from tonight's snapshot" >&2; exit 1; }
  done
  median=$(printf '%s\n' "${times[@]}" | sort -n | sed -n "$(( (runs + 1) / 2 ))p")
  printf '| %s | %d.%03d s | %s |\n' "$name" $((median / 1000)) $((median % 1000)) "$read"
}

echo "| ${size_gib} GiB, ${percent}% of 64 KiB blocks changed, page cache dropped | median of $runs | source bytes read |"
echo "|---|---|---|"
row "SYNC"
row "SYNC --since last night's snapshot" --since "$work/last.img" --changed-ranges "$work/delta.xml"
