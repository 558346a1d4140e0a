#!/usr/bin/env bash
# Compiler launcher: runs the command after LOG and appends "seconds source"
# to LOG (the source is the argument after -c).
log=$1; shift
start=$(date +%s.%N)
"$@"; rc=$?
src=""; prev=""
for arg in "$@"; do [ "$prev" = "-c" ] && src=$arg; prev=$arg; done
awk -v a="$start" -v b="$(date +%s.%N)" -v f="$(basename "$src")" \
  'BEGIN { printf "%.1f %s\n", b - a, f }' >> "$log"
exit $rc
