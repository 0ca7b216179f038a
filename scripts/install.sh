#!/usr/bin/env bash
# Builds basyn (release) and installs the binary, its man page and its bash, zsh and fish
# completions under PREFIX (default /usr/local), as `make install` would:
#   PREFIX/bin/basyn
#   PREFIX/share/man/man1/basyn.1
#   PREFIX/share/bash-completion/completions/basyn
#   PREFIX/share/zsh/site-functions/_basyn
#   PREFIX/share/fish/vendor_completions.d/basyn.fish
# BASYN_BINARY=PATH installs that executable instead of building one (for packaging).
set -euo pipefail
cd "$(dirname "$0")/.."

prefix=${1:-/usr/local}
bin=${BASYN_BINARY:-}
if [ -z "$bin" ]; then
  cargo build --release --locked
  bin=target/release/basyn
fi
[ -x "$bin" ] || { echo "install.sh: $bin is not an executable" >&2; exit 1; }

# Everything is generated before anything is installed, so that a failure leaves
# PREFIX as it was.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for what in man bash zsh fish; do
  "$bin" generate "$what" > "$work/$what"
done

install -D -m 755 "$bin"        "$prefix/bin/basyn"
install -D -m 644 "$work/man"  "$prefix/share/man/man1/basyn.1"
install -D -m 644 "$work/bash" "$prefix/share/bash-completion/completions/basyn"
install -D -m 644 "$work/zsh"  "$prefix/share/zsh/site-functions/_basyn"
install -D -m 644 "$work/fish" "$prefix/share/fish/vendor_completions.d/basyn.fish"
echo "installed basyn $("$prefix/bin/basyn" --version | cut -d' ' -f2) under $prefix (binary, man page, bash/zsh/fish completions)"
