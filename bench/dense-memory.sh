#!/usr/bin/env bash
# Memory with a state too large to hold: a dense image (random data, no zeros) with
# 1 KiB pieces (--chunk 1) has 32 MiB of piece digests per GiB, so a 24 GiB image has
# 768 MiB of them: as many as 384 GiB of data with the default 16 KiB pieces. Prints,
# for each step, the peak RSS (/usr/bin/time -f %M) next to the state file's size.
# Needs 2 × SIZE GiB free in /var/tmp.
#
#   bench/dense-memory.sh [SIZE_GIB=24]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh disable=SC1091
. bench/lib.sh
size=${1:-24}
cargo build --release --quiet
basyn="$PWD/target/release/basyn"
work=$(mktemp -d /var/tmp/basyn-dense.XXXXXX)
trap 'rm -rf "$work"; rm -f "$(bench_state_of "$work/src.img")" "$(bench_state_of "$work/dst.img")"' EXIT
head -c "${size}G" /dev/urandom > "$work/src.img"
cp "$work/src.img" "$work/dst.img"
step() {
  local what=$1; shift
  /usr/bin/time -f %M -o "$work/rss" "$basyn" "$@" --chunk 1 --stat > "$work/out"
  local state_mib=$(( $(stat -c %s "$(bench_state_of "$work/src.img")") >> 20 ))
  printf '| %s | %s | %s | %s |\n' "$what" "$(( $(tail -1 "$work/rss") >> 10 ))" "$state_mib" \
    "$(grep -E '^(Read|Blocks):' "$work/out" | tr -s ' ' | paste -sd ';')"
}
echo "| step (${size} GiB dense, 1 KiB pieces) | peak RSS (MiB) | state (MiB) | basyn --stat |"
echo "|---|---:|---:|---|"
step "index, building the state" index "$work/src.img"
step "index again, state loaded" index "$work/src.img"
step "index of the receiver" index "$work/dst.img"
sync=(-l "$work/src.img" -r "$work/dst.img" -a push -m sync)
step "unchanged SYNC, both states loaded" "${sync[@]}"
printf 'changed' | dd of="$work/src.img" bs=1 seek=$(( 7 << 30 )) conv=notrunc status=none
step "changed SYNC: source re-read, receiver's state loaded" "${sync[@]}"
