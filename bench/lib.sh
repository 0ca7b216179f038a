# Shared pieces of the benchmarks (bench/run.sh, bench/workload.sh); sourced, not run.

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
