# Shared pieces of the benchmarks (bench/run.sh, bench/workload.sh, bench/engine.sh); sourced, not run.
# shellcheck shell=bash
# shellcheck disable=SC2034  # the variables these functions set are for the caller

# bench_sshd WORK: starts a private sshd on a free 127.0.0.1 port, reachable as host
# `benchhost` (user root, its own host and user keys) through WORK/ssh_config, and waits
# until it answers. Exports BASYN_SSH_CONFIG and sets ssh_cmd ("ssh -F WORK/ssh_config").
# Its pid is in WORK/sshd.pid: the caller's EXIT trap kills it.
bench_sshd() {
  local work=$1 port
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
}

# bench_blocksync_fast: sets bsf to a blocksync-fast binary, or to "" when there is none.
# $BSF names an existing binary; otherwise it is built from $BSF_TARBALL (default
# /work/shared/peers/blocksync-fast-1.07.tar.gz) into $PEERS_DIR (default /var/tmp/peers)
# with its own ./configure && make, outside the repository, installing Debian's
# libgcrypt20-dev and libxxhash-dev first when they are missing (apt-get). A benchmark
# baseline only: nothing of it goes into basyn.
bench_blocksync_fast() {
  bsf=${BSF:-}
  if [ -z "$bsf" ]; then
    local peers=${PEERS_DIR:-/var/tmp/peers}
    local tarball=${BSF_TARBALL:-/work/shared/peers/blocksync-fast-1.07.tar.gz}
    bsf="$peers/blocksync-fast/src/blocksync-fast"
    if [ ! -x "$bsf" ] && [ -f "$tarball" ]; then
      local missing=() pkg
      for pkg in build-essential libgcrypt20-dev libxxhash-dev; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
      done
      if [ ${#missing[@]} -gt 0 ] && command -v apt-get >/dev/null; then
        echo "installing ${missing[*]} for blocksync-fast ..." >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 \
          || echo "apt-get install ${missing[*]} failed" >&2
      fi
      echo "building blocksync-fast in $peers ..." >&2
      mkdir -p "$peers"
      (cd "$peers" && tar -xzf "$tarball" && cd blocksync-fast && ./configure >configure.log 2>&1 \
        && nice -n 10 make >make.log 2>&1) \
        || echo "blocksync-fast did not build (see $peers/blocksync-fast/*.log; needs libgcrypt20-dev)" >&2
    fi
  fi
  [ -x "$bsf" ] || { echo "blocksync-fast not available: its rows are skipped" >&2; bsf=; }
}

# bench_make_images DIR SIZE NCHANGED REGION_MIB: the "real file system image" data.
# DIR/old.img: `mke2fs -q -t ext4 -d TREE old.img SIZE` (fixed UUID and hash seed), TREE
# being the first files of /usr (in sorted walk order) that fit in 60% of SIZE, so about a
# third of the 4 KiB blocks are zero. DIR/src.img: a sparse copy of old.img with NCHANGED
# random 4 KiB blocks (anywhere in the image, data or free space) and one REGION_MIB MiB
# region overwritten with random data, all from random.Random(42): the same every run.
# Sets size_bytes, tree_bytes (the /usr files copied), src_nonzero (non-zero bytes of the
# source, in 4 KiB blocks), zero_pct (share of zero 4 KiB blocks) and src_alloc (bytes
# allocated to src.img).
bench_make_images() {
  local dir=$1 size=$2 nchanged=$3 region_mib=$4
  size_bytes=$(numfmt --from=iec "$size")
  rm -rf "$dir/tree"
  mkdir -p "$dir/tree"
  python3 - "$size_bytes" > "$dir/files" <<'PY'
import os, sys
budget = int(sys.argv[1]) * 6 // 10
used = 0
out = sys.stdout.buffer
for root, dirs, files in os.walk("/usr"):
    dirs.sort()
    for name in sorted(files):
        p = os.path.join(root, name)
        try:
            st = os.lstat(p)
        except OSError:
            continue
        if not (os.path.isfile(p) or os.path.islink(p)) or not os.access(p, os.R_OK):
            continue
        cost = -(-st.st_size // 4096) * 4096 if not os.path.islink(p) else 0
        if used + cost > budget:
            if budget - used < 65536:
                sys.exit(0)
            continue  # too big for what is left: smaller files may still fit
        used += cost
        out.write(p[1:].encode("utf-8", "surrogateescape") + b"\0")
PY
  tar -C / --null --no-recursion -T "$dir/files" -cf - | tar -C "$dir/tree" -xf -
  tree_bytes=$(du -sb "$dir/tree" | cut -f1)
  rm -f "$dir/old.img" "$dir/src.img"
  mke2fs -q -t ext4 -U 6f1c1a3e-0b5c-4b8e-9d39-0e3c5a1b2c4d -E hash_seed=0d5e3f1a-2b4c-4d6e-8f10-213243546576 \
    -d "$dir/tree" "$dir/old.img" "$size" >&2
  rm -rf "$dir/tree" "$dir/files"
  cp --sparse=always "$dir/old.img" "$dir/src.img"
  python3 - "$dir/src.img" "$nchanged" "$region_mib" <<'PY'
import os, random, sys
path, n, region_mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
blocks = os.path.getsize(path) // 4096
rng = random.Random(42)
with open(path, "r+b") as f:
    for b in rng.sample(range(blocks), n):
        f.seek(b * 4096)
        f.write(rng.randbytes(4096))
    rb = region_mib * 256
    start = rng.randrange(0, blocks - rb + 1)
    f.seek(start * 4096)
    f.write(rng.randbytes(rb * 4096))
print(f"changed {n} blocks of 4 KiB and {region_mib} MiB at block {start}", file=sys.stderr)
PY
  # Non-zero data of the source, in 4 KiB blocks; zero share of the image.
  read -r src_nonzero zero_pct < <(python3 - "$dir/src.img" <<'PY'
import sys
z = n = 0
zero = bytes(1 << 20)
with open(sys.argv[1], "rb") as f:
    while True:
        buf = f.read(1 << 20)
        if not buf:
            break
        if buf == zero[:len(buf)]:
            z += len(buf) // 4096; n += len(buf) // 4096
            continue
        for i in range(0, len(buf), 4096):
            n += 1
            if buf[i:i + 4096] == zero[:4096]:
                z += 1
print((n - z) * 4096, round(100 * z / n))
PY
  )
  src_alloc=$(($(stat -c '%b*%B' "$dir/src.img")))
}

# bench_state_of PATH: where basyn (run as root, as these benchmarks are, here and over
# ssh to 127.0.0.1) keeps PATH's default state: /var/lib/basyn, named after the canonical
# path with "/" made "_".
bench_state_of() {
  local p
  p=$(realpath -m "$1")
  p=${p#/}
  echo "${BASYN_STATE_DIR:-/var/lib/basyn}/${p//\//_}.basyn-state"
}
