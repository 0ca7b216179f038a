#!/usr/bin/env bash
# Reads `cargo test` output on stdin and prints one line with the totals of its
# "test result:" lines: "N passed, N failed" (also "0 passed, 0 failed" when nothing ran).
set -euo pipefail
awk '
  /^test result:/ {
    for (i = 1; i < NF; i++) {
      if ($(i + 1) ~ /^passed/) passed += $i
      if ($(i + 1) ~ /^failed/) failed += $i
    }
  }
  END { printf "%d passed, %d failed\n", passed, failed }
'
