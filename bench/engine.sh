#!/usr/bin/env bash
# Benchmark of issue 10 ("Ahead of every peer on every path"): basyn against cat|ssh,
# zstd|ssh, rsync, blocksync-fast and b3sum, on the same data in the same run, in five
# scenarios and four places. Prints Markdown tables for docs/benchmarks.md.
#
#   bench/engine.sh [SIZE=2G]
#   env: RUNS=3 (timed runs per row)  SHAPED_SIZE=512M (image of the shaped links)
#        PLACES="local ssh 1g 100m"  COUNT=1 (one extra, untimed run per row counts device
#        bytes; 0: no such run, the device columns then show the warm timed runs)
#        CHANGED_BLOCKS / REGION_MIB (default: 5000 and 16 for 2 GiB, scaled to the size)
#        SSH_COUNT=tcp (count the ssh place's bytes from TCP_INFO; lo: plain ssh, count
#        the loopback interface)  BSF=PATH (a blocksync-fast binary)  B3SUM=PATH
#        PEERS_DIR=/var/tmp/peers
#
# Run it as root on an otherwise idle machine (it starts an sshd on 127.0.0.1, makes loop
# devices and mounts them); 2G takes about an hour. It builds release first
# (`nice -n 10 cargo build --release --quiet`); blocksync-fast is built from
# /work/shared/peers/blocksync-fast-1.07.tar.gz into /var/tmp/peers with its own
# ./configure && make, b3sum with `cargo install b3sum --root /var/tmp/peers/cargo`, both
# outside the repository, and their rows are skipped if that fails.
#
# Data (bench_make_images in bench/lib.sh, as bench/workload.sh): an ext4 image made with
# `mke2fs -d` from the first files of /usr that fit in 60% of SIZE, and the same image
# changed by CHANGED_BLOCKS random 4 KiB blocks and one REGION_MIB MiB region (seeded).
# The shaped links use a SHAPED_SIZE image of the same kind, its change scaled to its size.
# Places: "local" (no -h); "ssh": a private sshd on 127.0.0.1 (bench_sshd); "1g" and "100m":
# the same sshd behind bench/relay.py as the ssh ProxyCommand, 1 Gbit/s with 2 ms RTT and
# 100 Mbit/s with 40 ms RTT (rate cap and delay in the relay; the kernel has no netem).
# basyn reads the ssh config from BASYN_SSH_CONFIG, the peers get the same file by ssh -F.
# Scenarios, each starting from the receiver as stated (made untimed):
#   S1  initial: basyn COPY onto a new file (and SYNC onto a zeroed file); cp / cat|ssh /
#       zstd|ssh / rsync onto a new file; blocksync-fast onto a zeroed (sparse) file
#   S2  1% change, no states: the receiver is the old image; basyn --no-state
#   S2f 1% change, the receiver's state fresh (untimed `basyn index`), the source without
#       one; blocksync-fast with a saved digest file of the receiver
#   S3  no change, no states; S3f no change, both states (or the digest file) fresh
#       (floors: b3sum of the source for S3 locally; `true`, timed the same way, for S3f
#       locally; `ssh host true` for S3f over ssh)
# blocksync-fast "stateless" means what a user does without a kept digest: the digest of
# the destination made over ssh into a file, then --make-delta piped into --apply-delta.
# Every file lives on one of two ext4 file systems, each on its own loop device: the
# source side (source image, its basyn state, blocksync-fast's digests) and the receiver
# side (receiver image and its state). Their backing files stay in the page cache.
#
# Columns:
# - time: wall seconds of the command and then `sync RECEIVER` (so tools that do not
#   fsync pay for their writes, as basyn does), including ssh connection setup: median of
#   RUNS timed runs (min-max). Timed runs start with the page cache warm: both images (and
#   states, digests) read with cat just before.
# - CPU: user+nice+system+irq+softirq seconds of the whole machine (/proc/stat) during the
#   run, median; on the shaped links the relay's own CPU is taken off.
# - wire: bytes on the link both ways, counted outside the tools, median: the ssh stream
#   (TCP payload). Over ssh, the kernel's counters of each connection (TCP_INFO
#   bytes_acked + bytes_received, read at its end by `bench/relay.py --fdpass`, a
#   ProxyCommand that hands ssh the socket and relays nothing); on the shaped links, what
#   the relay carried. (The loopback interface's tx_bytes counts everyone's loopback
#   traffic; SSH_COUNT=lo uses it instead, with plain ssh. Its delta is also in the log.)
# - peak RSS local / remote: the largest process on each end, max over the timed runs.
#   Local: wait4's ru_maxrss of the command (its largest process, ssh clients included; not
#   basyn's ssh ControlMaster, which runs detached); for local basyn the client and a
#   `basyn serve` child separately if there is one (their VmHWM, sampled every 10 ms;
#   since 2b21a3a a local endpoint is a thread of the client, one process).
#   Remote: the remote command run under /usr/bin/time -f %M (basyn through --remote-path).
# - source read / written, receiver read / written: MiB that reached each side's loop
#   device (/sys/class/block/loopN/stat, sectors read and written, after `sync -f`), in the
#   one untimed counting run, which starts with the files' own page cache dropped (the loop
#   backing files stay cached): what the tool reads of the devices, with the kernel's
#   readahead (read_ahead_kb in the header), and everything written, file system metadata
#   and journal included.
# - basyn ÷ this: the median time of the scenario's first basyn row over this row's.
# After every run (counting ones too) `cmp` checks the receiver against the source; a
# difference fails the benchmark. A second table gives, for each place and scenario, basyn,
# the best peer and their ratio. Everything made (sshd, relays, mounts, loop devices, the
# work dir under /var/tmp) is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-2G}
RUNS=${RUNS:-3}
SHAPED_SIZE=${SHAPED_SIZE:-512M}
PLACES=${PLACES:-local ssh 1g 100m}
COUNT=${COUNT:-1}
for tool in rsync zstd /usr/bin/time /usr/sbin/sshd python3 mke2fs mkfs.ext4 losetup cmp tar fincore numfmt; do
  command -v "$tool" >/dev/null || { echo "bench needs $tool" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "bench needs root (loop devices, mount, sshd)" >&2; exit 1; }
started=$SECONDS
nice -n 10 cargo build --release --quiet
basyn="$PWD/${CARGO_TARGET_DIR:-target}/release/basyn"
basyn_rev=$(git describe --always --dirty 2>/dev/null || echo unknown)
py=$(python3 -c 'import sys; print(sys.executable)')  # the interpreter itself, not a shim
# shellcheck source=bench/lib.sh disable=SC1091  # followed with shellcheck -x
. bench/lib.sh

# --- peers, outside the repository
bench_blocksync_fast
b3sum=${B3SUM:-$(command -v b3sum || true)}
if [ -z "$b3sum" ]; then
  b3sum="${PEERS_DIR:-/var/tmp/peers}/cargo/bin/b3sum"
  if [ ! -x "$b3sum" ]; then
    echo "installing b3sum into ${b3sum%/bin/b3sum} ..." >&2
    nice -n 10 cargo install --quiet b3sum --root "${b3sum%/bin/b3sum}" >&2 || true
  fi
  [ -x "$b3sum" ] || { echo "b3sum not available: its rows are skipped" >&2; b3sum=; }
fi

work=$(mktemp -d /var/tmp/basyn-engine.XXXXXX)
loops=()
cleanup() {
  set +e
  local f d
  for f in "$work"/relay/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null; done
  [ -f "$work/sshd.pid" ] && kill "$(cat "$work/sshd.pid")" 2>/dev/null
  for d in "$work/tx" "$work/rx"; do mountpoint -q "$d" 2>/dev/null && umount "$d"; done
  # Only our own loop devices: a number once freed may be someone else's now.
  for d in "${loops[@]}"; do
    losetup -nO BACK-FILE "$d" 2>/dev/null | grep -qF "$work/" && losetup -d "$d"
  done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
mkdir "$work/relay" "$work/tx" "$work/rx"

# --- helpers, in the work dir
cat > "$work/then-sync" <<'SH'
#!/bin/sh
# then-sync RECEIVER CMD...: runs CMD, then fsyncs RECEIVER.
r=$1; shift
"$@" && exec sync "$r"
SH
cat > "$work/rtimed" <<SH
#!/bin/sh
exec /usr/bin/time -a -o '$work/rtime' -f '%M' "\$@"
SH
cat > "$work/rbasyn" <<SH
#!/bin/sh
[ "\$1" = serve ] && exec '$work/rtimed' '$basyn' "\$@"
exec '$basyn' "\$@"
SH
chmod +x "$work/then-sync" "$work/rtimed" "$work/rbasyn"

# measure.py OUT [--split EXE] -- CMD...: runs CMD; writes wall seconds, CPU seconds of
# the machine, lo tx bytes, ru_maxrss (KiB), exit code and, with --split, the peak VmHWM
# (KiB) of EXE processes under CMD: "client" ones and "serve" ones (argv[1] == serve).
cat > "$work/measure.py" <<'PY'
import os, subprocess, sys, threading, time
args = sys.argv[1:]
out = args.pop(0)
split = None
if args[0] == "--split":
    args.pop(0)
    split = os.path.realpath(args.pop(0))
assert args.pop(0) == "--"
def cpu():
    with open("/proc/stat") as f:
        v = f.readline().split()
    return int(v[1]) + int(v[2]) + int(v[3]) + int(v[6]) + int(v[7])
def lo():
    with open("/sys/class/net/lo/statistics/tx_bytes") as f:
        return int(f.read())
peaks = {"client": 0, "serve": 0}
stop = threading.Event()
def ppid(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])
def under(pid, root):
    for _ in range(20):
        if pid == root:
            return True
        if pid <= 1:
            return False
        pid = ppid(pid)
    return False
def poll(root):
    roles = {}
    while True:
        for n in os.listdir("/proc"):
            if not n.isdigit() or int(n) < root:
                continue
            pid = int(n)
            try:
                role = roles.get(pid)
                if role is None:
                    if os.readlink(f"/proc/{pid}/exe") != split or not under(pid, root):
                        continue
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        argv = f.read().split(b"\0")
                    role = roles[pid] = "serve" if len(argv) > 1 and argv[1] == b"serve" else "client"
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            peaks[role] = max(peaks[role], int(line.split()[1]))
            except OSError:
                continue
        if stop.wait(0.01):
            return
hz = os.sysconf("SC_CLK_TCK")
c0, l0 = cpu(), lo()
t0 = time.perf_counter()
p = subprocess.Popen(args)
poller = None
if split:
    poller = threading.Thread(target=poll, args=(p.pid,), daemon=True)
    poller.start()
_, status, ru = os.wait4(p.pid, 0)
t1 = time.perf_counter()
c1, l1 = cpu(), lo()
stop.set()
if poller:
    poller.join()
with open(out, "w") as f:
    f.write(f"{t1 - t0:.4f} {(c1 - c0) / hz:.2f} {l1 - l0} {ru.ru_maxrss} {os.waitstatus_to_exitcode(status)}"
            f" {peaks['client']} {peaks['serve']}\n")
PY

# restore.py DST TEMPLATE full|none|LIST: makes DST equal to TEMPLATE, holes included:
# writes TEMPLATE's 4 KiB blocks where they differ (full: compare everything; LIST: only
# the blocks listed, the others being known equal; none: none), then punches TEMPLATE's
# holes into DST. A missing DST, or one of another size, is copied whole.
cat > "$work/restore.py" <<'PY'
import array, ctypes, os, subprocess, sys
dst, tmpl, how = sys.argv[1:4]
B = 4096
size = os.path.getsize(tmpl)
if not os.path.exists(dst) or os.path.getsize(dst) != size:
    if os.path.exists(dst):
        os.unlink(dst)
    subprocess.run(["cp", "--sparse=always", tmpl, dst], check=True)
    sys.exit(0)
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
def data(fd):
    out, off = [], 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, min(end, size)))
        off = end
    return out
t = os.open(tmpl, os.O_RDONLY)
d = os.open(dst, os.O_RDWR)
def fix(b):
    want = os.pread(t, B, b * B)
    if os.pread(d, B, b * B) != want:
        os.pwrite(d, want, b * B)
if how == "full":
    M = 1 << 20
    for off in range(0, size, M):
        if os.pread(t, M, off) != os.pread(d, M, off):
            for b in range(off // B, min(off + M, size) // B):
                fix(b)
elif how != "none":
    blocks = array.array("q")
    with open(how, "rb") as f:
        blocks.frombytes(f.read())
    for b in blocks:
        fix(b)
# TEMPLATE's holes where DST has data: punch them (content is zero there by now).
holes, prev = [], 0
for s, e in data(t):
    if s > prev:
        holes.append((prev, s))
    prev = e
if prev < size:
    holes.append((prev, size))
have = data(d)
i = 0
for hs, he in holes:
    while i < len(have) and have[i][1] <= hs:
        i += 1
    j = i
    while j < len(have) and have[j][0] < he:
        s, e = max(hs, have[j][0]), min(he, have[j][1])
        if libc.fallocate(d, 3, s, e - s) != 0:  # PUNCH_HOLE | KEEP_SIZE
            raise OSError(ctypes.get_errno(), "fallocate")
        j += 1
os.fsync(d)
PY

# diff.py OLD NEW LIST: the 4 KiB blocks where OLD and NEW differ, as int64s.
cat > "$work/diff.py" <<'PY'
import array, sys
a, b, out = sys.argv[1:4]
B, M = 4096, 1 << 20
blocks = array.array("q")
with open(a, "rb") as fa, open(b, "rb") as fb:
    off = 0
    while True:
        x, y = fa.read(M), fb.read(M)
        if not x:
            break
        if x != y:
            for i in range(0, len(x), B):
                if x[i:i + B] != y[i:i + B]:
                    blocks.append((off + i) // B)
        off += len(x)
with open(out, "wb") as f:
    blocks.tofile(f)
print(len(blocks))
PY

# --- data
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
gib2=$((2 << 30))
declare -A set_size set_desc set_changed
# shellcheck disable=SC2154  # bench_make_images sets size_bytes, tree_bytes, zero_pct, src_nonzero
make_set() {  # make_set NAME SIZE: work/NAME/{old,src}.img, digests, the diff list
  local name=$1 sz=$2 n r
  mkdir -p "$work/$name"
  local bytes; bytes=$(numfmt --from=iec "$sz")
  if [ "$name" = main ] && [ -n "${CHANGED_BLOCKS:-}" ]; then n=$CHANGED_BLOCKS; else n=$(((5000 * bytes + gib2 / 2) / gib2)); fi
  if [ "$name" = main ] && [ -n "${REGION_MIB:-}" ]; then r=$REGION_MIB; else r=$(((16 * bytes + gib2 / 2) / gib2)); [ "$r" -ge 1 ] || r=1; fi
  echo "preparing the $sz ext4 image from /usr in $work/$name ..." >&2
  bench_make_images "$work/$name" "$sz" "$n" "$r"
  set_size[$name]=$size_bytes
  set_desc[$name]="$sz ext4 image of /usr files ($(mib "$tree_bytes") MiB of files, ${zero_pct}% zero 4 KiB blocks, $(mib "$src_nonzero") MiB non-zero)"
  set_changed[$name]="$n random 4 KiB blocks + one $r MiB region"
  echo "  ${set_desc[$name]}, changed ${set_changed[$name]} ($("$py" "$work/diff.py" "$work/$name/old.img" "$work/$name/src.img" "$work/$name/diff.blocks") blocks differ)" >&2
  if [ -n "$bsf" ]; then
    "$bsf" --make-digest -s "$work/$name/old.img" -f "$work/$name/old.digest" >/dev/null
    "$bsf" --make-digest -s "$work/$name/src.img" -f "$work/$name/src.digest" >/dev/null
  fi
}
need_main='' need_shaped=''
for place in $PLACES; do
  case $place in
    local|ssh) need_main=1 ;;
    1g|100m) need_shaped=1 ;;
    *) echo "unknown place $place (local ssh 1g 100m)" >&2; exit 1 ;;
  esac
done
total=0
[ -z "$need_main" ] || { make_set main "$size"; total=$((total + set_size[main])); }
[ -z "$need_shaped" ] || { make_set shaped "$SHAPED_SIZE"; total=$((total + set_size[shaped])); }

# --- the two sides: an ext4 file system each, on a loop device over a file in work
fs_bytes=$(((total + total / 4 + (256 << 20)) >> 20 << 20))
declare -A side_dev
for side in tx rx; do
  truncate -s "$fs_bytes" "$work/fs-$side.img"
  mkfs.ext4 -q -I 256 -E lazy_itable_init=0,lazy_journal_init=0 "$work/fs-$side.img"
  dev=$(losetup --find --show "$work/fs-$side.img")
  loops+=("$dev")
  side_dev[$side]=${dev#/dev/}
  mount -o noatime "$dev" "$work/$side"
done
read_ahead_kb=$(cat "/sys/class/block/${side_dev[tx]}/queue/read_ahead_kb")
for name in main shaped; do
  [ -f "$work/$name/src.img" ] || continue
  mkdir -p "$work/tx/$name" "$work/rx/$name"
  cp --sparse=always "$work/$name/src.img" "$work/tx/$name/src.img"
done
sync
# The templates are not needed in memory (restores read little of them).
for f in "$work"/main/*.img "$work"/shaped/*.img; do [ -f "$f" ] && dd if="$f" iflag=nocache count=0 status=none; done

# --- sshd, and the shaped links' ssh configs
bench_sshd "$work"
declare -A link_rate=([1g]=1G [100m]=100M) link_rtt=([1g]=2 [100m]=40)
{ cat "$work/ssh_config"
  echo "  ProxyCommand $py $PWD/bench/relay.py --fdpass --log-dir $work/relay %h %p"
  echo "  ProxyUseFdpass yes"
} > "$work/ssh_config.ssh"
for l in 1g 100m; do
  { cat "$work/ssh_config"
    echo "  ProxyCommand $py $PWD/bench/relay.py --rate ${link_rate[$l]} --rtt ${link_rtt[$l]} --log-dir $work/relay %h %p"
  } > "$work/ssh_config.$l"
done

# --- measuring one run
sectors() { local s; read -r -a s < "/sys/class/block/${side_dev[$1]}/stat"; echo "${s[2]} ${s[6]}"; }
# The backing files of both sides stay in the page cache (read again if evicted).
warm_backing() {
  local side res alloc
  for side in tx rx; do
    res=$(fincore -b -n -o RES "$work/fs-$side.img")
    alloc=$(($(stat -c '%b*%B' "$work/fs-$side.img")))
    [ "$res" -ge $((alloc - alloc / 50)) ] || cat "$work/fs-$side.img" > /dev/null
  done
}
side_files() { find "$work/tx/$set" "$work/rx/$set" -maxdepth 1 -type f; }
drop_cache() { local f; while read -r f; do dd if="$f" iflag=nocache count=0 status=none; done < <(side_files); }
warm_files() { local f; while read -r f; do cat "$f" > /dev/null; done < <(side_files); }
fmt_bytes() {
  awk -v b="$1" 'BEGIN { if (b == "-") print "-"; else if (b < 1e6) printf "%.1f kB\n", b / 1e3; else printf "%.1f MB\n", b / 1e6 }'
}
median() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

# Rows of the current group (place + scenario): kind (basyn|peer|floor), label, prep, cmd.
g_kind=() g_label=() g_prep=() g_cmd=()
row() { g_kind+=("$1"); g_label+=("$2"); g_prep+=("$3"); g_cmd+=("$4"); }
# Results of every row, for the tables.
out_rows=() sum_rows=() cmd_list=()
declare -A shown_cmd

# Receiver preparations (untimed). dst_is: what DST holds (src, old, or "" unknown).
dst_is=
rm_states() { rm -f "$(bench_state_of "$DST")" "$(bench_state_of "$SRC")"; }
restore() {  # restore TEMPLATE-NAME (old|src)
  local how=full
  if [ "$dst_is" = src ]; then
    if [ "$1" = old ]; then how="$work/$set/diff.blocks"; else how=none; fi
  elif [ "$dst_is" = "$1" ]; then how=none; fi
  "$py" "$work/restore.py" "$DST" "$work/$set/$1.img" "$how"
  dst_is=$1
}
p_new() { rm -f "$DST"; rm_states; dst_is=; }
p_zero() { rm -f "$DST"; rm_states; truncate -s "${set_size[$set]}" "$DST"; dst_is=; }
p_old() { restore old; rm_states; }
p_old_indexed() { p_old; "$basyn" index "$DST" >/dev/null; }
p_old_digest() { p_old; cp "$work/$set/old.digest" "$DIG"; }
p_same() { restore src; rm_states; }
p_same_indexed() { p_same; "$basyn" index "$SRC" >/dev/null; "$basyn" index "$DST" >/dev/null; }
p_same_digest() { p_same; cp "$work/$set/src.digest" "$DIG"; }

# run_once I COUNTING: one run of row I; sets res to "wall cpu wire rss_local rss_remote
# tx_read tx_written rx_read rx_written" (bytes, KiB for RSS).
run_once() {
  local i=$1 counting=$2 f
  eval "${g_prep[i]}"
  sync -f "$work/tx"; sync -f "$work/rx"
  warm_backing
  if [ "$counting" = 1 ]; then drop_cache; else warm_files; fi
  rm -f "$work/rtime" "$work"/relay/*.log
  local tx0 tx1 rx0 rx1
  tx0=$(sectors tx); rx0=$(sectors rx)
  local split=()
  [ "$place" = local ] && [ "${g_kind[i]}" = basyn ] && split=(--split "$basyn")
  if ! "$py" "$work/measure.py" "$work/m" "${split[@]}" -- "$work/then-sync" "$DST" \
      bash -c "set -o pipefail; ${g_cmd[i]}" > "$work/out" 2> "$work/err"; then
    echo "measure failed" >&2; cat "$work/err" >&2; exit 1
  fi
  local wall cpu lo rss rc client serve
  read -r wall cpu lo rss rc client serve < "$work/m"
  if [ "$rc" != 0 ]; then
    echo "[$place $scen] ${g_label[i]}: exit $rc" >&2; tail -20 "$work/err" >&2; exit 1
  fi
  # Relays and counters end with their ssh connection; wait up to 10 s for their counts.
  local relay_bytes=0 relay_cpu=0 up down rcpu
  for _ in $(seq 100); do compgen -G "$work/relay/*.pid" >/dev/null || break; sleep 0.1; done
  for f in "$work"/relay/*.pid; do
    [ -f "$f" ] || continue
    echo "[$place $scen] ${g_label[i]}: relay $(cat "$f") still running 10 s after the run: stopped, its bytes may be missing" >&2
    kill "$(cat "$f")" 2>/dev/null || true
    sleep 0.2
    rm -f "$f"
  done
  for f in "$work"/relay/*.log; do
    [ -f "$f" ] || continue
    read -r up down rcpu < "$f"
    relay_bytes=$((relay_bytes + up + down))
    relay_cpu=$(awk -v x="$relay_cpu" -v y="$rcpu" 'BEGIN { print x + y }')
  done
  sync -f "$work/tx"; sync -f "$work/rx"
  tx1=$(sectors tx); rx1=$(sectors rx)
  if ! cmp "$SRC" "$DST"; then
    echo "[$place $scen] ${g_label[i]}: RECEIVER DIFFERS FROM SOURCE" >&2; exit 1
  fi
  dst_is=src
  local wire=- rrss=-
  case $wire_mode in
    lo) wire=$lo ;;
    tcp) wire=$relay_bytes ;;
    relay) wire=$relay_bytes; cpu=$(awk -v x="$cpu" -v y="$relay_cpu" 'BEGIN { printf "%.2f", x - y }') ;;
  esac
  lo_delta=$lo
  if [ -s "$work/rtime" ]; then
    rrss=$( (grep -hE '^[0-9]+$' "$work/rtime" || true) | sort -n | tail -1)
  fi
  local lrss=$rss
  if [ ${#split[@]} -gt 0 ] && [ "$serve" -gt 0 ]; then lrss=$client; rrss=$serve; fi
  [ "$lrss" -gt 0 ] || lrss=$rss
  local a0 b0 a1 b1 c0 d0 c1 d1
  read -r a0 b0 <<< "$tx0"; read -r a1 b1 <<< "$tx1"; read -r c0 d0 <<< "$rx0"; read -r c1 d1 <<< "$rx1"
  res="$wall $cpu $wire $lrss ${rrss:--} $(((a1 - a0) * 512)) $(((b1 - b0) * 512)) $(((c1 - c0) * 512)) $(((d1 - d0) * 512))"
}

# run_group: every row of the group, the counting run first, then RUNS timed runs, the rows
# taking turns within each run (so a busy moment of the machine is shared among them).
run_group() {
  local n=${#g_label[@]} i r
  local -a walls cpus wires lr rr txr txw rxr rxw
  for ((i = 0; i < n; i++)); do walls[i]=; cpus[i]=; wires[i]=; lr[i]=0; rr[i]=; txr[i]=; txw[i]=; rxr[i]=; rxw[i]=; done
  local first=1
  [ "$COUNT" = 1 ] && first=0
  for ((r = first; r <= RUNS; r++)); do
    for ((i = 0; i < n; i++)); do
      run_once "$i" "$([ "$r" = 0 ] && echo 1 || echo 0)"
      local w c wi l rm a b c2 d
      read -r w c wi l rm a b c2 d <<< "$res"
      echo "[$place $scen] ${g_label[i]}, $([ "$r" = 0 ] && echo "counting run" || echo "run $r/$RUNS"): ${w} s, CPU ${c} s, wire $wi (lo $lo_delta), RSS $((l / 1024)) / $([ "$rm" = - ] && echo - || echo $((rm / 1024))) MiB, source r/w $(mib "$a") / $(mib "$b"), receiver r/w $(mib "$c2") / $(mib "$d") MiB" >&2
      if [ "$r" = 0 ] || [ "$COUNT" != 1 ]; then
        txr[i]+=" $a"; txw[i]+=" $b"; rxr[i]+=" $c2"; rxw[i]+=" $d"
      fi
      [ "$r" = 0 ] && continue
      walls[i]+=" $w"; cpus[i]+=" $c"; wires[i]+=" $wi"
      [ "$l" -le "${lr[i]}" ] || lr[i]=$l
      if [ "$rm" != - ]; then [ -n "${rr[i]}" ] && [ "$rm" -le "${rr[i]}" ] || rr[i]=$rm; fi
    done
  done
  # The group's rows, and its line of the summary.
  local base='' best='' best_label='' floors=() med
  local -a meds
  for ((i = 0; i < n; i++)); do
    # shellcheck disable=SC2086
    meds[i]=$(median ${walls[i]})
    [ -n "$base" ] || { [ "${g_kind[i]}" = basyn ] && base=${meds[i]}; }
  done
  for ((i = 0; i < n; i++)); do
    med=${meds[i]}
    local ratio=- wire=-
    if [ "${g_kind[i]}" != basyn ]; then
      ratio=$(awk -v a="$base" -v b="$med" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')
      if [ "${g_kind[i]}" = peer ]; then
        if [ -z "$best" ] || awk -v a="$med" -v b="$best" 'BEGIN { exit !(a < b) }'; then best=$med; best_label=${g_label[i]}; fi
      else
        floors+=("${g_label[i]}: $(printf '%.3f' "$med")")
      fi
    fi
    # shellcheck disable=SC2086
    if [ "$wire_mode" != none ]; then wire=$(fmt_bytes "$(median ${wires[i]})"); fi
    local mn mx
    # shellcheck disable=SC2086
    mn=$(printf '%s\n' ${walls[i]} | sort -g | head -1)
    # shellcheck disable=SC2086
    mx=$(printf '%s\n' ${walls[i]} | sort -g | tail -1)
    # shellcheck disable=SC2086
    out_rows+=("| $place_label | $scen | ${g_label[i]} | $(printf '%.3f' "$med") ($(printf '%.3f' "$mn")–$(printf '%.3f' "$mx")) | $(printf "%.2f" "$(median ${cpus[i]})") | $wire | $((lr[i] / 1024)) / $([ -n "${rr[i]}" ] && echo $((rr[i] / 1024)) || echo -) | $(mib "$(median ${txr[i]})") / $(mib "$(median ${txw[i]})") | $(mib "$(median ${rxr[i]})") / $(mib "$(median ${rxw[i]})") | $ratio |")
    if [ -z "${shown_cmd[${g_label[i]}@$place]:-}" ]; then
      shown_cmd[${g_label[i]}@$place]=1
      cmd_list+=("- $place_label, ${g_label[i]}: \`$(show_cmd "${g_cmd[i]}")\`")
    fi
  done
  local sum_best=- sum_ratio=-
  if [ -n "$best" ]; then
    sum_best="$best_label: $(printf '%.3f' "$best")"
    sum_ratio=$(awk -v a="$base" -v b="$best" 'BEGIN { printf "%.2f", a / b }')
  fi
  local fl=-
  [ ${#floors[@]} -eq 0 ] || fl=$(IFS=';'; echo "${floors[*]}")
  sum_rows+=("| $place_label | $scen | $(printf '%.3f' "$base") | $sum_best | $sum_ratio | $fl |")
  g_kind=() g_label=() g_prep=() g_cmd=()
}
# A command as shown in the list: the work dir's paths by their role.
show_cmd() {
  local c=$1
  c=${c//"$work/rtimed "/}
  c=${c//" --remote-path $work/rbasyn"/}
  c=${c//"--rsync-path='rsync'"/}
  c=${c//"$SRC"/SRC}; c=${c//"$DST"/DST}; c=${c//"$DIG"/DIGEST}; c=${c//"$DIGT"/FETCHED.digest}
  c=${c//"$basyn"/basyn}; [ -z "$bsf" ] || c=${c//"$bsf"/blocksync-fast}
  [ -z "$b3sum" ] || c=${c//"$b3sum"/b3sum}
  [ -z "$cfg" ] || c=${c//"-F $cfg"/-F CONFIG}
  c=${c//|/\\|}
  echo "$c"
}

# --- the places
for place in $PLACES; do
  case $place in
    local) set=main; place_label=local; wire_mode=none; H=""; ssh=; RT=; cfg= ;;
    ssh) set=main; place_label=ssh
      if [ "${SSH_COUNT:-tcp}" = lo ]; then wire_mode=lo; cfg="$work/ssh_config"; else wire_mode=tcp; cfg="$work/ssh_config.ssh"; fi ;;
    1g) set=shaped; place_label="1 Gbit/s, 2 ms"; wire_mode=relay; cfg="$work/ssh_config.1g" ;;
    100m) set=shaped; place_label="100 Mbit/s, 40 ms"; wire_mode=relay; cfg="$work/ssh_config.100m" ;;
  esac
  SRC="$work/tx/$set/src.img" DST="$work/rx/$set/dst.img"
  DIG="$work/tx/$set/saved.digest" DIGT="$work/tx/$set/fetched.digest"
  dst_is=
  rm -f "$DST"
  if [ "$place" != local ]; then
    export BASYN_SSH_CONFIG=$cfg
    ssh="ssh -F $cfg"
    H="-h benchhost --remote-path $work/rbasyn"
    RT="$work/rtimed "
  fi
  B="$basyn -l $SRC -r $DST ${H:+$H }-a push"
  # S1: initial
  row basyn "basyn COPY, new file" p_new "$B -m copy"
  row basyn "basyn SYNC, zeroed file" p_zero "$B -m sync"
  if [ "$place" = local ]; then
    row peer "cp" p_new "cp $SRC $DST"
    row peer "rsync -I --inplace --no-whole-file" p_new "rsync -I --inplace --no-whole-file $SRC $DST"
    [ -z "$bsf" ] || row peer "blocksync-fast, zeroed file" p_zero "$bsf -s $SRC -d $DST"
  else
    row peer "cat \| ssh 'cat > file; sync'" p_new "cat $SRC | $ssh benchhost \"${RT}sh -c 'cat > $DST && sync $DST'\""
    row peer "zstd -1 -T1 \| ssh 'zstd -d > file'" p_new "zstd -q -1 -T1 -c $SRC | $ssh benchhost \"${RT}sh -c 'zstd -q -d -c > $DST && sync $DST'\""
    row peer "rsync -I --inplace --no-whole-file" p_new "rsync -I --inplace --no-whole-file -e '$ssh' --rsync-path='${RT}rsync' $SRC benchhost:$DST"
    [ -z "$bsf" ] || row peer "blocksync-fast, remote digest + delta, zeroed file" p_zero \
      "$ssh benchhost \"${RT}$bsf --make-digest -s $DST\" > $DIGT && $bsf --make-delta -s $SRC -f $DIGT | $ssh benchhost \"${RT}$bsf --apply-delta -d $DST\""
  fi
  scen=S1; run_group
  # S2 and S3: no states; S2f and S3f: fresh states
  for scen in S2 S3; do
    prep=p_old; [ "$scen" = S3 ] && prep=p_same
    row basyn "basyn SYNC --no-state" $prep "$B -m sync --no-state"
    if [ "$place" = local ]; then
      row peer "rsync -I --inplace --no-whole-file" $prep "rsync -I --inplace --no-whole-file $SRC $DST"
      [ -z "$bsf" ] || row peer "blocksync-fast, no digest" $prep "$bsf -s $SRC -d $DST"
      [ "$scen" = S2 ] || [ -z "$b3sum" ] || row floor "b3sum of the source (floor)" $prep "$b3sum $SRC"
    else
      row peer "rsync -I --inplace --no-whole-file" $prep "rsync -I --inplace --no-whole-file -e '$ssh' --rsync-path='${RT}rsync' $SRC benchhost:$DST"
      [ -z "$bsf" ] || row peer "blocksync-fast, remote digest + delta" $prep \
        "$ssh benchhost \"${RT}$bsf --make-digest -s $DST\" > $DIGT && $bsf --make-delta -s $SRC -f $DIGT | $ssh benchhost \"${RT}$bsf --apply-delta -d $DST\""
    fi
    run_group
    scen=${scen}f
    if [ "$scen" = S2f ]; then
      row basyn "basyn SYNC, receiver state fresh" p_old_indexed "$B -m sync"
      dprep=p_old_digest
    else
      row basyn "basyn SYNC, both states fresh" p_same_indexed "$B -m sync"
      dprep=p_same_digest
    fi
    if [ "$place" = local ]; then
      [ -z "$bsf" ] || row peer "blocksync-fast, saved digest" $dprep "$bsf -s $SRC -d $DST -f $DIG"
      # What the timing itself costs (start, wait, `sync RECEIVER`): S3f's floor.
      [ "$scen" = S2f ] || row floor "true, timed the same way (floor)" p_same "true"
    else
      [ -z "$bsf" ] || row peer "blocksync-fast, saved digest" $dprep \
        "$bsf --make-delta -s $SRC -f $DIG | $ssh benchhost \"${RT}$bsf --apply-delta -d $DST\""
      [ "$scen" = S2f ] || row floor "ssh host true (floor)" p_same "$ssh benchhost true"
    fi
    run_group
  done
  rm -f "$(bench_state_of "$DST")" "$DST"
done

# --- the tables
cpu_model=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
mem_gib=$(awk '/^MemTotal/ { printf "%.0f", $2 / 1048576 }' /proc/meminfo)
# shellcheck disable=SC1091
os_name=$(. /etc/os-release && echo "$PRETTY_NAME")
echo
echo "$(date -u +%Y-%m-%d), \`bench/engine.sh $size\` (RUNS=$RUNS, SHAPED_SIZE=$SHAPED_SIZE, PLACES=\"$PLACES\", COUNT=$COUNT), basyn $basyn_rev; $(nproc) cores ($cpu_model), $mem_gib GiB, $os_name, Linux $(uname -r); \
${need_main:+local and ssh: ${set_desc[main]}, changed ${set_changed[main]}; }${need_shaped:+shaped links: ${set_desc[shaped]}, changed ${set_changed[shaped]}; }\
ssh on 127.0.0.1 (shaped: through bench/relay.py; wire: ssh stream bytes both ways, $([ "${SSH_COUNT:-tcp}" = lo ] && echo "over ssh lo tx_bytes" || echo "over ssh from TCP_INFO")), page cache warm for the timed runs, device bytes $([ "$COUNT" = 1 ] && echo "from an untimed run with the files' own cache dropped" || echo "of the warm timed runs (median)") (loop read_ahead_kb $read_ahead_kb); time: median of $RUNS (min–max), s; CPU: whole machine, s; RSS: MiB"
echo
echo "| link | scenario | run | time (s) | CPU (s) | wire | peak RSS local / remote (MiB) | source read / written (MiB) | receiver read / written (MiB) | basyn ÷ this |"
echo "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"
printf '%s\n' "${out_rows[@]}"
echo
echo "| link | scenario | basyn (s) | best peer (s) | basyn ÷ best peer | floor (s) |"
echo "|---|---|---:|---|---:|---|"
printf '%s\n' "${sum_rows[@]}"
echo
echo "Commands (SRC, DST: the images; CONFIG: the ssh config of the place; remote commands run under /usr/bin/time, basyn with --remote-path to such a wrapper):"
echo
printf '%s\n' "${cmd_list[@]}"
echo "benchmark took $(((SECONDS - started) / 60)) min $(((SECONDS - started) % 60)) s" >&2
