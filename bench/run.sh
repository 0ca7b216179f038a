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

# --- a private sshd on a free loopback port
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
ssh-keygen -q -t ed25519 -N '' -f "$work/hostkey"
ssh-keygen -q -t ed25519 -N '' -f "$work/userkey"
cp "$work/userkey.pub" "$work/authorized_keys"
cat > "$work/sshd_config" <<CFG
Port $port
ListenAddress 127.0.0.1
HostKey $work/hostkey
AuthorizedKeysFile $work/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
PidFile $work/sshd.pid
SetEnv XDG_CACHE_HOME=$work/cache
CFG
echo "[127.0.0.1]:$port $(cat "$work/hostkey.pub")" > "$work/known_hosts"
cat > "$work/ssh_config" <<CFG
Host benchhost
  HostName 127.0.0.1
  Port $port
  User root
  IdentityFile $work/userkey
  IdentitiesOnly yes
  UserKnownHostsFile $work/known_hosts
  StrictHostKeyChecking yes
CFG
mkdir -p /run/sshd
/usr/sbin/sshd -f "$work/sshd_config" -E "$work/sshd.log"
for _ in $(seq 50); do ssh -F "$work/ssh_config" benchhost true 2>/dev/null && break; sleep 0.1; done
export BASYN_SSH_CONFIG="$work/ssh_config"
ssh_cmd="ssh -F $work/ssh_config"

# --- data: a random source, a receiver that differs in PCT% scattered 4 KiB blocks
echo "preparing ${size_mib} MiB images in $work ..." >&2
head -c "${size_mib}M" /dev/urandom > "$work/src.img"
cp "$work/src.img" "$work/old.img"
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
# measure NAME BYTES_CMD -- COMMAND...: runs COMMAND under /usr/bin/time
measure() {
  local name=$1 reset=$2; shift 2
  case $reset in
    old) cp "$work/old.img" "$work/dst.img" ;;
    none) rm -f "$work/dst.img" ;;
    same) ;;
  esac
  sync
  /usr/bin/time -f '%e %M' -o "$work/time" "$@" > "$work/out" 2> "$work/err" || { cat "$work/err" >&2; exit 1; }
  read -r secs rss < "$work/time"
  local bytes
  bytes=$(grep -oP 'Both \K[0-9]+' "$work/out" 2>/dev/null || grep -oP 'Total bytes sent: \K[0-9,]+' "$work/out" 2>/dev/null | tr -d , || echo "-")
  [ -z "$bytes" ] && bytes="-"
  if ! cmp -s "$work/src.img" "$work/dst.img"; then echo "$name: receiver differs from source!" >&2; exit 1; fi
  rows+=("| $name | $secs | $bytes | $((rss / 1024)) |")
  echo "$name: ${secs}s, $bytes bytes, $((rss / 1024)) MiB max RSS (of the local command)" >&2
}

measure "dd \| ssh (full copy)" none \
  sh -c "dd if='$work/src.img' bs=4M status=none | $ssh_cmd benchhost \"dd of='$work/dst.img' bs=4M status=none\""
measure "basyn COPY (initial, zstd-3)" none \
  "$basyn" -l "$work/src.img" -r "$work/dst.img" -h benchhost -a push -m copy --stat
measure "basyn COPY (initial, --zlevel 0)" none \
  "$basyn" -l "$work/src.img" -r "$work/dst.img" -h benchhost -a push -m copy --zlevel 0 --stat
measure "rsync --inplace --no-whole-file (changed)" old \
  rsync -e "$ssh_cmd" --inplace --no-whole-file --stats "$work/src.img" "benchhost:$work/dst.img"
measure "basyn SYNC (changed, defaults)" old \
  "$basyn" -l "$work/src.img" -r "$work/dst.img" -h benchhost -a push -m sync --stat
measure "basyn SYNC --chunk 4 (changed)" old \
  "$basyn" -l "$work/src.img" -r "$work/dst.img" -h benchhost -a push -m sync --chunk 4 --stat
measure "basyn SYNC (unchanged)" same \
  "$basyn" -l "$work/src.img" -r "$work/dst.img" -h benchhost -a push -m sync --stat
measure "basyn SYNC local, no ssh (changed, --chunk 4)" old \
  "$basyn" -l "$work/src.img" -r "$work/dst.img" -a push -m sync --chunk 4 --stat

echo
echo "$(date -u +%Y-%m-%d), ${size_mib} MiB random image, ${pct}% scattered 4 KiB blocks changed, $(nproc) cores, ssh on 127.0.0.1, page cache warm"
echo
echo "| run | time (s) | bytes on the wire | max RSS (MiB) |"
echo "|---|---:|---:|---:|"
printf '%s\n' "${rows[@]}"
