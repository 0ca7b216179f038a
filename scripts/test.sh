#!/usr/bin/env bash
# Runs everything CI runs: installs missing system packages, checks formatting and
# lints, then the whole test suite (unit, property, integration on files, loop devices
# and a real sshd on 127.0.0.1). With CI set, a missing prerequisite fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi; }

need=()
command -v losetup   >/dev/null || need+=(mount)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v chattr    >/dev/null || need+=(e2fsprogs)
command -v blockdev  >/dev/null || need+=(util-linux)
command -v partx     >/dev/null || need+=(util-linux)
command -v fincore   >/dev/null || need+=(util-linux-extra)
[ -x /usr/sbin/sshd ]            || need+=(openssh-server)
command -v ssh       >/dev/null || need+=(openssh-client)
command -v ssh-keygen >/dev/null || need+=(openssh-client)
[ -x /usr/bin/time ]             || need+=(time)
command -v ip        >/dev/null || need+=(iproute2)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v thin_delta  >/dev/null || need+=(thin-provisioning-tools)
command -v lvs         >/dev/null || need+=(lvm2)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
# sshd refuses to start without its privilege-separation directory.
[ -d /run/sshd ] || as_root mkdir -p /run/sshd

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
# One test binary at a time: the loop-device and sshd tests share system resources.
# The last line says the totals; the exit status is cargo test's.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --all-targets -- --test-threads=2 2>&1 | tee "$log" || status=${PIPESTATUS[0]}
scripts/totals.sh < "$log"
exit "$status"
