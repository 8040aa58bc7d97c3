#!/usr/bin/env bash
# Evaluation's memory beyond the model on a COCO-5k-sized split: peak RSS of a run whose
# task tests on 5,000 images x 5 captions (experiments/bench/eval-coco5k.toml) minus that of
# the same run testing on 50 (one small batch) and on 1,000 (the same batches in flight, so
# the difference is what grows with the split). The data (about 5,100 synthetic 256 px
# JPEGs, under target/) is generated once by scripts/make_synthetic.py (numpy, Pillow).
#   scripts/bench-eval-memory.sh                   # RECALL=target/release/recall PYTHON=python3
#   RECALL_BEFORE=/path/to/older/recall scripts/bench-eval-memory.sh   # and another build's
#   SET='data.cache="off"' scripts/bench-eval-memory.sh                  # one more --set
set -euo pipefail
cd "$(dirname "$0")/.."
recall="${RECALL:-target/release/recall}"
python="${PYTHON:-python3}"
data="target/synthetic-coco5k"
out="${OUT_DIR:-target/bench-eval-memory}"
mkdir -p "$out"
[ -f "$data/jsonl/test.jsonl" ] ||
    "$python" scripts/make_synthetic.py "$data" --images 5100 --test 5000 --captions 5 --shard-size 1000
cfg=experiments/bench/eval-coco5k.toml

peak() { # BINARY NAME MAX_TEST: peak RSS in MB of one run
    local dir="$out/$2"
    rm -rf "$dir"
    "$1" -q run "$cfg" --set "task[0].path=\"$PWD/$data/jsonl\"" --set "task[0].max_test=$3" \
        ${SET:+--set "$SET"} --run-dir "$dir" >/dev/null
    "$python" -c "import json,sys; s=json.load(open(sys.argv[1])); print(round(s['performance']['peak_memory_bytes']/2**20))" "$dir/summary.json"
}

for build in "$recall" ${RECALL_BEFORE:+"$RECALL_BEFORE"}; do
    small=$(peak "$build" small 50)
    mid=$(peak "$build" mid 1000)
    full=$(peak "$build" full 5000)
    texts=$("$python" -c "import json,sys; print(sum(len(json.loads(l)['captions']) for l in open(sys.argv[1])))" "$data/jsonl/test.jsonl")
    echo "$build: peak RSS testing on 50 / 1000 / 5000 images: $small / $mid / $full MB; COCO-5k-sized" \
        "($texts captions) takes $((full - small)) MB more than 50 images, $((full - mid)) MB more than 1000 (target <= 300)"
done
