#!/usr/bin/env bash
# README.md is assembled from docs/sections/*.md (in name order) so that each part has one owner.
set -euo pipefail
cd "$(dirname "$0")/.."
order=(00_intro data geometry callbacks adapters probe sweep report results benchmark_moe 99_status)
: > README.md
for name in "${order[@]}"; do
  f="docs/sections/$name.md"
  [ -f "$f" ] || continue
  cat "$f" >> README.md
  printf '\n' >> README.md
done
