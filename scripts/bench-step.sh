#!/usr/bin/env bash
# Recall's training step against PyTorch eager's, in one go on one machine, at one thread
# count: `recall bench` on experiments/bench/PRESET.toml and scripts/torch_step.py --preset
# PRESET, alternating for ROUNDS rounds (default 3; shared machines drift, so each side's
# figure is the median of its rounds' medians), then the ratios (Recall / PyTorch) of the
# step time and of the peak memory. Needs a built `recall` (RECALL=..., default target/release/recall) and a Python
# with torch (PYTHON=..., default python3).
#   scripts/bench-step.sh [STEPS] [PRESET...]        # default: 20 cpu-c-clip cpu-lora
#   THREADS=2 RECALL_BENCH_ARGS="--host-batch" ...   # extra torch_step.py arguments
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-20}"
shift || true
presets=("$@")
[ ${#presets[@]} -gt 0 ] || presets=(cpu-c-clip cpu-lora)
recall="${RECALL:-target/release/recall}"
python="${PYTHON:-python3}"
threads="${THREADS:-$(nproc)}"
out="${OUT_DIR:-target/bench-step}"
mkdir -p "$out"
export RAYON_NUM_THREADS="$threads" OMP_NUM_THREADS="$threads"
rounds="${ROUNDS:-3}"
for p in "${presets[@]}"; do
    : >"$out/torch-$p.jsonl"
    for r in $(seq "$rounds"); do
        "$recall" -q bench "experiments/bench/$p.toml" --steps "$steps" --warmup 3 --json "$out/recall-$p-$r.json" \
            >/dev/null
        "$python" scripts/torch_step.py --preset "$p" --steps "$steps" --warmup 3 --threads "$threads" \
            ${TORCH_STEP_ARGS:-} >>"$out/torch-$p.jsonl"
    done
done
"$python" - "$out" "$rounds" "${presets[@]}" <<'PY'
import json, statistics, sys
out, rounds, presets = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
print(f"{'preset':<12}{'recall ms':>11}{'torch ms':>10}{'ratio':>8}{'recall MiB':>12}{'torch MiB':>11}{'ratio':>8}"
      f"{'tensors':>9}{'reads':>7}")
for p in presets:
    rs = [json.load(open(f"{out}/recall-{p}-{i}.json")) for i in range(1, rounds + 1)]
    ts = [json.loads(line) for line in open(f"{out}/torch-{p}.jsonl") if line.startswith("{")]
    r = rs[-1]
    rm, tm = statistics.median(x["step"]["median_ms"] for x in rs), statistics.median(x["ms_per_step"] for x in ts)
    rb, tb = max(x["peak_memory_bytes"] or 0 for x in rs), max(x["peak_memory_bytes"] or 1 for x in ts)
    print(f"{p:<12}{rm:>11.1f}{tm:>10.1f}{rm / tm:>8.2f}{rb / 2**20:>12.0f}{tb / 2**20:>11.0f}{rb / tb:>8.2f}"
          f"{r['counts']['tensors_created']:>9}{r['counts']['host_reads']:>7}")
PY
