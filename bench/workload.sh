#!/usr/bin/env bash
# Benchmark, "real file system image" workload: basyn against rsync and blocksync-fast on
# an ext4 image filled from /usr, over ssh on 127.0.0.1 (a private sshd, as bench/run.sh)
# and locally. Prints a Markdown table for docs/benchmarks.md.
#
#   bench/workload.sh [SIZE=2G] [CHANGED_BLOCKS=5000] [REGION_MIB=16]
#
# Needs root (sshd, loop devices, mount), openssh-server, rsync, e2fsprogs, python3,
# /usr/bin/time. blocksync-fast is built from $BSF_TARBALL (default
# /work/shared/peers/blocksync-fast-1.07.tar.gz) into $PEERS_DIR (default /var/tmp/peers)
# with its own ./configure && make (bench_blocksync_fast in bench/lib.sh; needs
# build-essential libgcrypt20-dev libxxhash-dev, installed with apt-get when missing);
# $BSF names an existing binary instead. If it cannot be built, its rows are skipped.
#
# Data (bench_make_images in bench/lib.sh): `mke2fs -q -t ext4 -d TREE old.img SIZE`,
# TREE being the first files of /usr (in sorted walk order) that fit in 60% of SIZE; so
# about a third of the 4 KiB blocks are zero (the header line gives the measured share).
# The changed source src.img is old.img with CHANGED_BLOCKS random 4 KiB blocks (anywhere
# in the image, data or free space) and one REGION_MIB MiB region overwritten with random
# data, all from random.Random(42): the same every run.
#
# Every SYNC-like run starts from a receiver that is a fresh copy of old.img attached as a
# loop device (`losetup --find --show`); the tools write to /dev/loopN. Untimed per-run
# setup: `basyn index` of the receiver (state runs), blocksync-fast's digest of the
# receiver (digest runs). COPY runs write a new file into a freshly made ext4 file system
# on its own loop device (the receiver does not exist before).
#
# Measured for each run, the same way for every tool:
# - time: /usr/bin/time -f %e of the command followed by `sync RECEIVER` (fsync of the
#   device or file), so tools that do not fsync (rsync, blocksync-fast) pay for their
#   writes as basyn, which fdatasyncs, does. ssh connection setup is included.
# - max RSS: /usr/bin/time %M, local side (the largest process of the command: basyn, or
#   the tool/ssh client of a pipeline) / remote side (the remote command is run under
#   $work/rtimed, /usr/bin/time -o; for basyn through --remote-path $work/rbasyn).
# - receiver read / written: sectors read (field 3) and written (field 7) of
#   /sys/class/block/loopN/stat of the receiver's loop device, before and after the run,
#   after `blockdev --flushbufs` (and, for COPY, `sync -f` of the mounted file system), with
#   the page cache of the backing file (and of src.img) dropped before the run
#   (`dd iflag=nocache count=0`): both sides start cold. For COPY the figures are the
#   file system's: data, metadata and journal. With WARM=1 the source instead starts in
#   the page cache (read once with `cat` before each run; the receiver still starts cold),
#   as the figures of bench/run.sh were taken: then time is the engine's, not the disk's.
# - bytes on the wire (payload through ssh, not the ssh packets): basyn's `--stat` Both;
#   rsync's --stats "Total bytes sent" + "Total bytes received"; blocksync-fast: its
#   delta stream counted by a `dd` relay between it and ssh (dd's "bytes copied"), plus,
#   without a kept digest file, the digest it fetches over ssh first (the digest's size).
#   Device reads include the kernel's readahead (the loop device's read_ahead_kb, given in
#   the header line), so a tool reading scattered pieces shows more than it asked for.
# - check: `cmp` of src.img against the receiver; any difference fails the benchmark.
# - basyn's own --stat figures for the receiver ("Read ... remote", "Blocks ... bytes
#   written") are shown beside the measured ones.
# The receiver's state is /var/lib/basyn/basyn-bench-$$.basyn-state (over SSH a chosen remote
# state must be in the state directory or beside the device, and the device is /dev/loopN),
# removed on exit; the source's is under the work dir.
# Otherwise no state lands in /var/lib/basyn: basyn always gets --state/--remote-state under the work
# dir (or --no-state). Everything (sshd, loop devices, mount, work dir under /var/tmp) is
# removed on exit.
# shellcheck disable=SC2154  # ssh_cmd, size_bytes, ...: set by the functions of bench/lib.sh
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-2G}
nchanged=${2:-5000}
region_mib=${3:-16}
for tool in rsync /usr/bin/time /usr/sbin/sshd python3 mke2fs losetup blockdev cmp tar; do
  command -v "$tool" >/dev/null || { echo "bench needs $tool" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "bench needs root (loop devices, mount, sshd)" >&2; exit 1; }
nice -n 10 cargo build --release --quiet
basyn="$PWD/target/release/basyn"

work=$(mktemp -d /var/tmp/basyn-workload.XXXXXX)
recv_dev=  # the receiver's loop device, whose counters are read
recv_state=  # the receiver's state (set below)
cleanup() {
  set +e
  [ -f "$work/sshd.pid" ] && kill "$(cat "$work/sshd.pid")" 2>/dev/null
  mountpoint -q "$work/mnt" 2>/dev/null && umount "$work/mnt"
  # Only our own loop device: a number once freed may be someone else's now.
  [ -n "$recv_dev" ] && losetup -nO BACK-FILE "$recv_dev" 2>/dev/null | grep -qF "$work/" \
    && losetup -d "$recv_dev"
  rm -f "$recv_state"
  rm -rf "$work"
}
trap cleanup EXIT

# --- a private sshd on a free loopback port (host "benchhost"; sets ssh_cmd)
# shellcheck source=bench/lib.sh disable=SC1091  # followed with shellcheck -x
. bench/lib.sh
bench_sshd "$work"

# --- blocksync-fast, built from its tarball with its own build system, outside the repo
bench_blocksync_fast

# Remote commands run under /usr/bin/time, to see the receiver's RSS.
cat > "$work/rtimed" <<SH
#!/bin/sh
exec /usr/bin/time -a -o '$work/rtime' -f '%M' "\$@"
SH
cat > "$work/rbasyn" <<SH
#!/bin/sh
[ "\$1" = serve ] && exec '$work/rtimed' '$basyn' "\$@"
exec '$basyn' "\$@"
SH
chmod +x "$work/rtimed" "$work/rbasyn"

# --- data: an ext4 image over part of /usr, and the same image changed
echo "preparing a $size ext4 image from /usr in $work ..." >&2
bench_make_images "$work" "$size" "$nchanged" "$region_mib"
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
echo "image: $(mib "$size_bytes") MiB, /usr files $(mib "$tree_bytes") MiB, source non-zero $(mib "$src_nonzero") MiB (${zero_pct}% zero blocks), allocated $(mib "$src_alloc") MiB" >&2
mkdir "$work/state" "$work/mnt"
sync

# --- receivers
recv=      # what the tools write and cmp checks: /dev/loopN, or a file on the mounted fs
recv_backing=
detach_receiver() {
  if mountpoint -q "$work/mnt"; then umount "$work/mnt"; fi
  if [ -n "$recv_dev" ]; then losetup -d "$recv_dev"; recv_dev=; fi
  rm -f "$work/dst.img" "$work/fs.img" "$work/state"/*
}
# The receiver as it was before the change, as a loop device.
old_receiver() {
  detach_receiver
  cp --sparse=always "$work/old.img" "$work/dst.img"
  recv_dev=$(losetup --find --show "$work/dst.img")
  read_ahead_kb=$(cat "/sys/class/block/${recv_dev#/dev/}/queue/read_ahead_kb")
  recv=$recv_dev
  recv_backing="$work/dst.img"
}
# No receiver yet: it will be created as mnt/new.img on a fresh ext4 file system.
new_file_receiver() {
  detach_receiver
  truncate -s $(((size_bytes + size_bytes / 5 + (64 << 20)) >> 20 << 20)) "$work/fs.img"
  mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0 "$work/fs.img"
  recv_dev=$(losetup --find --show "$work/fs.img")
  mount "$recv_dev" "$work/mnt"
  recv="$work/mnt/new.img"
  recv_backing="$work/fs.img"
}
drop_cache() { for f in "$@"; do dd if="$f" iflag=nocache count=0 status=none; done; }
sectors() { local s; read -r -a s < "/sys/class/block/${recv_dev#/dev/}/stat"; echo "${s[2]} ${s[6]}"; }
cat > "$work/then-sync" <<'SH'
#!/bin/sh
# then-sync RECEIVER CMD...: runs CMD, then fsyncs RECEIVER.
r=$1; shift
"$@" && exec sync "$r"
SH
chmod +x "$work/then-sync"

rows=()
# run NAME -- COMMAND...: measures COMMAND (see the header), checks receiver == source.
run() {
  local name=$1; shift
  sync
  drop_cache "$work/src.img" "$recv_backing"
  [ -z "${WARM:-}" ] || cat "$work/src.img" > /dev/null
  blockdev --flushbufs "$recv_dev"
  local r0 w0 r1 w1
  read -r r0 w0 < <(sectors)
  rm -f "$work/rtime" "$work"/wire.*
  if ! /usr/bin/time -f '%e %M' -o "$work/time" "$work/then-sync" "$recv" "$@" > "$work/out" 2> "$work/err"; then
    echo "$name: failed" >&2; cat "$work/err" >&2; exit 1
  fi
  mountpoint -q "$work/mnt" && sync -f "$work/mnt"
  blockdev --flushbufs "$recv_dev"
  read -r r1 w1 < <(sectors)
  if ! cmp "$work/src.img" "$recv"; then echo "$name: RECEIVER DIFFERS FROM SOURCE" >&2; exit 1; fi
  local secs rss rrss wire said alloc=""
  read -r secs rss < "$work/time"
  rrss=$( (grep -hE '^[0-9]+$' "$work/rtime" 2>/dev/null || true) | sort -n | tail -1)
  rrss=${rrss:+$((rrss / 1024))}
  if grep -q '^Traffic:' "$work/out"; then                        # basyn --stat
    wire=$(grep -oP 'Both \K[0-9]+' "$work/out")
    [ -n "$host" ] || wire="- ($wire)"
    said="$(mib "$(grep -oP 'Read: +local [0-9]+ bytes, remote \K[0-9]+' "$work/out")") / $(mib "$(grep -oP '\b\K[0-9]+(?= bytes written)' "$work/out")")"
  elif grep -q 'Total bytes sent' "$work/out"; then               # rsync --stats
    wire=$(grep -oP 'Total bytes (sent|received): \K[0-9,]+' "$work/out" | tr -d , | paste -sd+ | bc)
    said="-"
  else                                                          # blocksync-fast
    wire=$( (cat "$work"/wire.* 2>/dev/null || true) | paste -sd+ | bc)
    wire=${wire:--}
    said="-"
  fi
  if [ "$recv" != "$recv_dev" ]; then
    alloc="receiver allocated $(mib $(($(stat -c '%b*%B' "$recv")))) MiB (source non-zero $(mib "$src_nonzero"), allocated $(mib "$src_alloc"))"
  fi
  local rd wr
  rd=$(mib $(((r1 - r0) * 512))); wr=$(mib $(((w1 - w0) * 512)))
  rows+=("| $name | $secs | $((rss / 1024)) / ${rrss:--} | $rd | $wr | $wire | $said | $alloc |")
  echo "$name: ${secs}s, RSS $((rss / 1024))/${rrss:--} MiB, receiver read $rd MiB, written $wr MiB, wire $wire, basyn says $said $alloc" >&2
}
# dd as a byte counter between a producer and ssh: `... | count NAME | ssh ...`
count="dd bs=1M"
wire_of() { echo "grep -oP '^[0-9]+(?= bytes)' $1 > $1.n"; }

recv_state=/var/lib/basyn/basyn-bench-$$.basyn-state
mkdir -p /var/lib/basyn
S=(--state "$work/state/src.state" --remote-state "$recv_state")
H=(-h benchhost --remote-path "$work/rbasyn")

# --- basyn
host=1
old_receiver; "$basyn" index "$recv" --state "$recv_state" >/dev/null
run "basyn SYNC, ssh, receiver state fresh" "$basyn" -l "$work/src.img" -r "$recv" --stat "${H[@]}" -a push -m sync "${S[@]}"
old_receiver; "$basyn" index "$recv" --state "$recv_state" --chunk 4 >/dev/null
run "basyn SYNC --chunk 4, ssh, receiver state fresh" "$basyn" -l "$work/src.img" -r "$recv" --stat "${H[@]}" -a push -m sync --chunk 4 "${S[@]}"
old_receiver
run "basyn SYNC, ssh, --no-state" "$basyn" -l "$work/src.img" -r "$recv" --stat "${H[@]}" -a push -m sync --no-state
new_file_receiver
run "basyn COPY, ssh, new file (builds states)" "$basyn" -l "$work/src.img" -r "$recv" --stat "${H[@]}" -a push -m copy "${S[@]}"
host=
old_receiver; "$basyn" index "$recv" --state "$recv_state" >/dev/null
run "basyn SYNC, local, receiver state fresh" "$basyn" -l "$work/src.img" -r "$recv" --stat -a push -m sync "${S[@]}"
old_receiver
run "basyn SYNC, local, --no-state" "$basyn" -l "$work/src.img" -r "$recv" --stat -a push -m sync --no-state
new_file_receiver
run "basyn COPY, local, new file (builds states)" "$basyn" -l "$work/src.img" -r "$recv" --stat -a push -m copy "${S[@]}"

# --- rsync
host=1
old_receiver
run "rsync --inplace --no-whole-file --write-devices, ssh" \
  rsync -e "$ssh_cmd" --inplace --no-whole-file --write-devices --stats \
  --rsync-path="$work/rtimed rsync" "$work/src.img" "benchhost:$recv"

# --- blocksync-fast
if [ -n "$bsf" ]; then
  dig="$work/state/bsf.digest"
  # Over ssh, with the digest file kept on the sender (made from the receiver, untimed).
  old_receiver; "$bsf" --make-digest -s "$recv" -f "$dig" >/dev/null
  run "blocksync-fast, ssh, delta with kept digest" bash -c "set -o pipefail
    '$bsf' --make-delta -s '$work/src.img' -f '$dig' | $count 2>'$work/dd' \
      | $ssh_cmd benchhost \"'$work/rtimed' '$bsf' --apply-delta -d '$recv'\" && $(wire_of "$work/dd") \
      && mv '$work/dd.n' '$work/wire.delta'"
  # Over ssh, without one: the receiver's digest is fetched first (its documented way).
  old_receiver
  run "blocksync-fast, ssh, digest fetched + delta" bash -c "set -o pipefail
    $ssh_cmd benchhost \"'$work/rtimed' '$bsf' --make-digest -s '$recv'\" > '$work/dig.run' \
    && stat -c %s '$work/dig.run' > '$work/wire.digest' \
    && '$bsf' --make-delta -s '$work/src.img' -f '$work/dig.run' | $count 2>'$work/dd' \
      | $ssh_cmd benchhost \"'$work/rtimed' '$bsf' --apply-delta -d '$recv'\" && $(wire_of "$work/dd") \
      && mv '$work/dd.n' '$work/wire.delta'"
  host=
  old_receiver; rm -f "$dig"; "$bsf" --make-digest -s "$recv" -f "$dig" >/dev/null
  run "blocksync-fast, local, kept digest" "$bsf" -s "$work/src.img" -d "$recv" -f "$dig"
  old_receiver
  run "blocksync-fast, local, no digest" "$bsf" -s "$work/src.img" -d "$recv"
  new_file_receiver
  run "blocksync-fast, local, new file" "$bsf" -s "$work/src.img" -d "$recv"
fi
detach_receiver

echo
echo "$(date -u +%Y-%m-%d), $size ext4 image of /usr files (${zero_pct}% zero 4 KiB blocks, $(mib "$src_nonzero") MiB non-zero), changed: $nchanged random 4 KiB blocks + one $region_mib MiB region of random data, $(nproc) cores, ssh on 127.0.0.1, $([ -n "${WARM:-}" ] && echo "source in the page cache, receiver's" || echo "page cache") dropped before each run, receiver loop device read_ahead_kb $read_ahead_kb"
echo
echo "| run | time (s) | max RSS local / remote (MiB) | receiver read (MiB) | receiver written (MiB) | bytes on the wire | basyn --stat: receiver read / written (MiB) | note |"
echo "|---|---:|---:|---:|---:|---:|---:|---|"
printf '%s\n' "${rows[@]}"
