#!/usr/bin/env bash
# The GPU check: on a machine with a GPU, in under 5 minutes,
#  1. every host op forward and backward on CUDA against the CPU (f32 within 1e-4; bf16 too);
#  2. the quickstart experiment on CUDA;
#  3. the training-step benchmark (`recall bench experiments/gpu-bench.toml`, CLIP ViT-B/32,
#     batch 64) on CUDA in f32 and bf16 mixed precision, with a --phases pass, and the same
#     step in PyTorch eager (scripts/torch_step.py --preset vitb32) when PyTorch is installed;
# then one summary table. The full log goes to $OUT/gpu-check.log (default ./gpu-check/).
#
#   dist/recall-cuda-13.0-sm90/gpu-check.sh          # from the bundle scripts/build-cuda.sh makes
#   RECALL=target/cuda/release/recall scripts/gpu-check.sh   # from a checkout
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ -z "${RECALL:-}" ]; then
    RECALL="$here/recall"
fi
if [ -d "$here/experiments" ]; then EXP="$here/experiments"; else EXP="$here/../experiments"; fi
if [ -f "$here/torch_step.py" ]; then TORCH_STEP="$here/torch_step.py"; else TORCH_STEP="$here/scripts/torch_step.py"; fi
OUT="${OUT:-$PWD/gpu-check}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-check.log") 2>&1

echo "== GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi failed"
"$RECALL" --version

echo "== host ops on CUDA against the CPU"
# device-check exits non-zero when an op is beyond its dtype's tolerance.
"$RECALL" device-check --device cuda --dtype f32 --json "$OUT/ops-f32.json"; export OPS_F32_RC=$?
"$RECALL" device-check --device cuda --dtype bf16 --json "$OUT/ops-bf16.json"; export OPS_BF16_RC=$?

echo "== quickstart on CUDA"
rm -rf "$OUT/runs"
SECONDS=0
"$RECALL" run -q "$EXP/quickstart.toml" --set experiment.device=cuda --run-dir "$OUT/runs/quickstart-cuda"
echo "quickstart wall seconds: $SECONDS"

echo "== training step: f32 and bf16 on CUDA (recall bench, then PyTorch eager)"
# recall bench times the real step (model, optimizer, strategies) with no syncs but the step's
# own reads; --phases is a second, synchronised pass that splits the time by phase.
# RECALL_BENCH_EXTRA passes more arguments (e.g. a toggle's A/B run under another name).
for p in f32 bf16; do
    "$RECALL" -q bench "$EXP/gpu-bench.toml" --set experiment.device=cuda --set train.precision=$p \
        --steps 20 --warmup 3 --json "$OUT/bench-$p.json" ${RECALL_BENCH_EXTRA:-}
    "$RECALL" -q bench "$EXP/gpu-bench.toml" --set experiment.device=cuda --set train.precision=$p \
        --steps 5 --warmup 2 --phases --json "$OUT/bench-$p-phases.json" ${RECALL_BENCH_EXTRA:-}
done
if python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    python3 "$TORCH_STEP" --preset vitb32 --device cuda > "$OUT/torch.jsonl" && cat "$OUT/torch.jsonl"
else
    echo "PyTorch with CUDA is not installed here; skipped"
fi

echo "== summary"
python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(p):
    try:
        with open(os.path.join(out, p)) as f:
            return json.load(f)
    except Exception:
        return None
rows = []
for dt in ["f32", "bf16"]:
    ops = load(f"ops-{dt}.json")
    if ops is None:
        rows.append((f"host ops {dt} (CUDA vs CPU)", "missing", "", "", "FAIL")); continue
    fw = max(o["forward"] for o in ops)
    bw = max((o["backward"] or 0) for o in ops)
    worst = max(ops, key=lambda o: max(o["forward"], o["backward"] or 0))["op"]
    ok = os.environ.get(f"OPS_{dt.upper()}_RC") == "0"
    rows.append((f"host ops {dt}: {len(ops)} ops", f"fwd {fw:.1e}", f"bwd {bw:.1e}", f"worst {worst}", "ok" if ok else "FAIL"))
qs = load("runs/quickstart-cuda/summary.json")
if qs:
    r = qs["continual"]["retrieval/i2t_r1"]
    rows.append(("quickstart on CUDA", f"Last I2T R@1 {r['last']:.1f}", f"{qs['steps']} steps", f"{qs['train_seconds']:.1f} s train", "ok"))
else:
    rows.append(("quickstart on CUDA", "no summary", "", "", "FAIL"))
for p in ["f32", "bf16"]:
    s = load(f"bench-{p}.json")
    if s:
        mem = s["peak_memory_bytes"] or 0
        c = s["counts"]
        rows.append((f"recall step {p} (B={s['batch']})", f"{s['step']['median_ms']:.1f} ms/step",
                     f"{c['tensors_created']} tensors, {c['host_reads']} reads", f"peak {mem / 2**30:.2f} GiB", "ok"))
    else:
        rows.append((f"recall step {p}", "no bench report", "", "", "FAIL"))
try:
    for line in open(os.path.join(out, "torch.jsonl")):
        t = json.loads(line)
        rows.append((f"pytorch eager {t['mode']} (B={t['batch']})", f"{t['ms_per_step']:.1f} ms/step", f"{t['images_per_second']:.0f} img/s", f"peak {t['peak_memory_bytes'] / 2**30:.2f} GiB", "ok"))
except FileNotFoundError:
    pass
w = [max(len(r[i]) for r in rows) for i in range(5)]
for r in rows:
    print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)))
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(rows, f, indent=1)
sys.exit(0 if all(r[4] == "ok" for r in rows) else 1)
PY
