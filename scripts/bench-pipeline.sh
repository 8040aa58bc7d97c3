#!/usr/bin/env bash
# The input pipeline's benchmarks, in one go on one machine (experiments/bench/pipeline.toml
# on the synthetic JPEGs of scripts/make_synthetic.py, generated once under target/):
#   1. throughput: `recall bench --loader` (decode + RandomResizedCrop + normalise, WORKERS
#      decode threads) against scripts/torch_loader.py (torchvision DataLoader, PIL, the same
#      transforms, WORKERS worker processes), alternating for ROUNDS rounds; the ratio;
#   2. overlap: the step of a compute-bound model (a wider, deeper ViT) fed by the loader
#      (`--streamed`) against the same step on batches prepared before it; the ratio;
#   3. memory: peak RSS of a training run on LARGE images (one epoch) against the same number
#      of steps on SMALL images (LARGE / SMALL epochs); the difference.
# Needs a built `recall` (RECALL=..., default target/release/recall) and a Python with torch,
# torchvision, numpy and Pillow (PYTHON=..., default python3).
#   scripts/bench-pipeline.sh                      # WORKERS=2 ROUNDS=3 SMALL=1000 LARGE=50000
#   SKIP_MEMORY=1 scripts/bench-pipeline.sh        # only 1 and 2
set -euo pipefail
cd "$(dirname "$0")/.."
recall="${RECALL:-target/release/recall}"
python="${PYTHON:-python3}"
workers="${WORKERS:-2}"
rounds="${ROUNDS:-3}"
small="${SMALL:-1000}"
large="${LARGE:-50000}"
data="target/synthetic-$large"
out="${OUT_DIR:-target/bench-pipeline}"
mkdir -p "$out"
[ -f "$data/jsonl/train.jsonl" ] || "$python" scripts/make_synthetic.py "$data" --images "$large" --test 1000
cfg=experiments/bench/pipeline.toml
sets=(--set "task[0].path=\"$PWD/$data/jsonl\"" --set "data.workers=$workers")

echo "== throughput: $workers workers, batch 128 at 224 px"
: >"$out/torch.jsonl"
for r in $(seq "$rounds"); do
    "$recall" -q bench "$cfg" "${sets[@]}" --loader --steps 20 --json "$out/recall-loader-$r.json" >/dev/null
    "$python" scripts/torch_loader.py "$data/jsonl" --workers "$workers" --batches 20 >>"$out/torch.jsonl"
done
"$python" - "$out" "$rounds" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
r = statistics.median(json.load(open(f"{out}/recall-loader-{i}.json"))["images_per_second"] for i in range(1, rounds + 1))
t = statistics.median(json.loads(l)["images_per_second"] for l in open(f"{out}/torch.jsonl") if l.startswith("{"))
print(f"recall {r:.1f} images/s, torchvision DataLoader {t:.1f} images/s: ratio {r / t:.2f} (target >= 1.0)")
PY

echo "== overlap: a compute-bound step with and without the loader feeding it"
big=(--set model.vision.width=256 --set model.vision.layers=4 --set model.vision.heads=4 --set model.vision.patch_size=16)
for r in $(seq "$rounds"); do
    "$recall" -q bench "$cfg" "${sets[@]}" "${big[@]}" --task synthetic --steps 8 --warmup 2 --json "$out/prebuilt-$r.json" >/dev/null
    "$recall" -q bench "$cfg" "${sets[@]}" "${big[@]}" --task synthetic --steps 8 --warmup 2 --streamed --json "$out/streamed-$r.json" >/dev/null
done
"$python" - "$out" "$rounds" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
med = lambda k: statistics.median(json.load(open(f"{out}/{k}-{i}.json"))["step"]["median_ms"] for i in range(1, rounds + 1))
p, s = med("prebuilt"), med("streamed")
print(f"step on prepared batches {p:.0f} ms, fed by the loader {s:.0f} ms: ratio {s / p:.3f} (target <= 1.05)")
PY

[ -n "${SKIP_MEMORY:-}" ] && exit 0
echo "== memory: the same steps on $small and on $large images"
for n in "$small" "$large"; do
    epochs=$(( large / n ))
    /usr/bin/time -f "%M" -o "$out/rss-$n.txt" "$recall" -q run "$cfg" "${sets[@]}" --set "task[0].max_train=$n" \
        --set "train.epochs=$epochs" --run-dir "$out/run-$n" --overwrite >/dev/null
done
"$python" - "$out" "$small" "$large" <<'PY'
import sys
out, small, large = sys.argv[1:]
kb = lambda n: int(open(f"{out}/rss-{n}.txt").read().split()[-1])
a, b = kb(small), kb(large)
print(f"peak RSS {a / 1024:.0f} MB with {small} images, {b / 1024:.0f} MB with {large}: {(b - a) / 1024:+.0f} MB (target <= +300)")
PY
