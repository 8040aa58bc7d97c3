#!/usr/bin/env bash
# Fuzz every target of fuzz/ (recall-fuzz) for SECONDS each (default 600: ten minutes), one
# after the other; crash and hang inputs land in target/fuzz-findings. Exits 1 on any finding.
#   scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-600}"
shift || true
cargo build --release -p recall-fuzz
exec target/release/recall-fuzz --seconds "$seconds" --seed "${FUZZ_SEED:-0}" "$@"
