#!/usr/bin/env bash
# Kill and resume, TRIALS times (default 20): the quickstart as one long task (its two tasks'
# shapes in one, 16 epochs), checkpointed every 10 steps, is SIGKILLed at a random moment
# of its training, resumed with `recall run --resume` (killed again while kills remain in the
# trial, KILLS per trial, default 1) and must end with the numbers and weights of an
# unbroken run, bit for bit. Prints each trial's verdict and the count.
# Needs a built `recall` (RECALL=..., default target/release/recall).
#   scripts/kill-resume.sh [TRIALS]
set -euo pipefail
cd "$(dirname "$0")/.."
recall="${RECALL:-target/release/recall}"
trials="${1:-20}"
kills="${KILLS:-1}"
out="${OUT_DIR:-target/kill-resume}"
rm -rf "$out"
mkdir -p "$out"
python3 - experiments/quickstart.toml "$out/one-task.toml" <<'PY'
import re, sys
src = open(sys.argv[1]).read()
head, evaluator = src.split("[[task]]", 1)[0], src[src.index("[[evaluator]]"):]
head = re.sub(r"\[train\]\nepochs = \d+", "[train]\nepochs = 16\ncheckpoint_every_steps = 10", head)
task = '[[task]]\nname = "shapes"\nshapes = ["circle", "square", "triangle", "cross", "ring", "diamond"]\n\n'
open(sys.argv[2], "w").write(head + task + evaluator)
PY
exp="$out/one-task.toml"
start=$(date +%s.%N)
"$recall" run -q "$exp" --run-dir "$out/unbroken" >/dev/null
length=$(python3 -c "import time; print(max(2.0, $(date +%s.%N) - $start))")
same=0
for t in $(seq "$trials"); do
    dir="$out/trial-$t"
    "$recall" run -q "$exp" --run-dir "$dir" >/dev/null 2>&1 &
    pid=$!
    for k in $(seq "$kills"); do
        sleep "$(python3 -c "import random; print(random.uniform(0.15, 0.9) * $length)")"
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        if [ -f "$dir/summary.json" ]; then break; fi
        if [ "$k" -lt "$kills" ]; then
            "$recall" run -q --resume "$dir" >/dev/null 2>&1 &
            pid=$!
        fi
    done
    [ -f "$dir/summary.json" ] || "$recall" run -q --resume "$dir" >/dev/null
    at=$(grep -o 'continuing from a mid-task checkpoint.*global_step=[0-9]*' "$dir/log.txt" | grep -o '[0-9]*$' | tr '\n' ' ' || true)
    if python3 - "$out/unbroken" "$dir" <<'PY'
import json, sys
a, b = (json.load(open(f"{d}/summary.json")) for d in sys.argv[1:])
keys = ["results", "epoch_losses", "epoch_terms", "continual", "steps"]
same = all(a[k] == b[k] for k in keys)
same &= open(f"{sys.argv[1]}/checkpoints/task-01.safetensors", "rb").read() == open(f"{sys.argv[2]}/checkpoints/task-01.safetensors", "rb").read()
sys.exit(0 if same else 1)
PY
    then same=$((same + 1)); echo "trial $t: identical (resumed at global step ${at:-none})"
    else echo "trial $t: DIFFERENT (resumed at global step ${at:-none})"; fi
done
echo "$same of $trials resumed runs equal the unbroken one bit for bit"
