#!/usr/bin/env bash
# Run every method of the mini-vlcl comparison (one seed) and print the table.
#   experiments/mini-vlcl/run-all.sh [SEED]
#   METHODS="finetune c-clip" EPOCHS=10 experiments/mini-vlcl/run-all.sh 1
# Each method is the fine-tuning baseline of mini-vlcl.toml plus `--set` overrides; runs go
# to runs/mini-vlcl/METHOD-seedS (METHOD-e10-seedS with EPOCHS=10). Finished runs are
# skipped; killed ones are resumed. METHODS picks some of the methods (default: all);
# EPOCHS sets the epochs per task (default: the file's 3).
set -euo pipefail
cd "$(dirname "$0")/../.."
seed="${1:-0}"
recall="${RECALL:-target/release/recall}"
[ -x "$recall" ] || cargo build --release
"$recall" fetch minilm-l6
"$recall" data prepare mnist textiles emoji-twitter animal-mnist emoji-google
if [ ! -f runs/mini-vlcl-base/summary.json ]; then
  "$recall" run experiments/mini-vlcl/pretrain.toml --run-dir runs/mini-vlcl-base
fi

lora='plugin="lora",rank=8,alpha=16,dropout=0.0,targets=["vision.*","text.*"]'
declare -A methods=(
  [finetune]=""
  [lora]="adapter={$lora,merge_after_task=false}"
  [lora-merge]="adapter={$lora,merge_after_task=true,merge_coefficient=0.5}"
  [ewc]='strategy=[{plugin="ewc",lambda=1000.0}]'
  [lwf]='strategy=[{plugin="lwf"}]'
  [zscl]='strategy=[{plugin="zscl",we_every=10}]|reference={name="reference",source="jsonl",path="dataset:emoji-google",max_train=1000}'
  [wise-ft]='strategy=[{plugin="wise-ft",alpha=0.8}]'
  [c-clip]="adapter={$lora,merge_after_task=true,merge_coefficient=0.5}|strategy=[{plugin=\"ckc\",dim=128}]"
  # C-CLIP as its released code runs it: LoRA r16 on the MLP layers (projections, embeddings
  # and norms train fully), CKC from the first task with a per-modality projector on raw
  # features made anew each task, the whole model averaged 1, 1/2, 1/3, ... after each task.
  # c-clip-code without CKC: what the consolidation term adds (the paper's task-1 ablation).
  [c-clip-code-no-ckc]="adapter={plugin=\"lora\",rank=16,alpha=32,dropout=0.1,targets=[\"vision.*.mlp.*\",\"text.*.mlp.*\"],merge_after_task=true,merge_scope=\"trained\",merge_schedule=\"c-clip-code\"}"
  # The paper's baselines as C-CLIP's code runs them: its "ZSCL" row is LwF at T = 1
  # (0.5 per direction, weight 2, the teacher at the student's logit scale) against the old
  # model from the first task; its EWC takes the Fisher of the model each task starts from on
  # that task's held-out split, lambda 0.4 in the lambda/2 form, previous task only.
  [zscl-cclip-table]='strategy=[{plugin="lwf",temperature=1.0,average_directions=true,weight=2.0,teacher_scale="student"}]|train.old_model_on_first_task=true'
  [ewc-cclip-code]='strategy=[{plugin="ewc",lambda=0.4,mode="online",gamma=0.0,fisher="before-task",fisher_batches=16}]'
  # Replay with a host-kept memory of 500 exemplars (about 15 % of the four tasks' training
  # data), reservoir-sampled: ER joins 64 of them to every batch; DER++ replays 64 through a
  # forward of their own against the features they entered with.
  [er]='strategy=[{plugin="replay",memory=500,batch_size=64}]'
  [der]='strategy=[{plugin="der",memory=500,batch_size=64,alpha=0.1,beta=0.5}]'
  # The presets of experiments/c-clip/ (their own optimizer and schedule), run as they are.
  [c-clip-paper]="file:experiments/c-clip/paper.toml"
  [c-clip-authors-code]="file:experiments/c-clip/authors-code.toml"
  [c-clip-code]="adapter={plugin=\"lora\",rank=16,alpha=32,dropout=0.1,targets=[\"vision.*.mlp.*\",\"text.*.mlp.*\"],merge_after_task=true,merge_scope=\"trained\",merge_schedule=\"c-clip-code\"}|strategy=[{plugin=\"ckc\",dim=128,batch_norm=\"per-modality\",normalize_inputs=false,fresh_per_task=true}]|train.old_model_on_first_task=true"
)
order=(finetune lora lora-merge ewc ewc-cclip-code lwf zscl zscl-cclip-table wise-ft er der c-clip c-clip-code
  c-clip-code-no-ckc c-clip-paper c-clip-authors-code)
if [ -n "${METHODS:-}" ]; then
  read -ra order <<< "$METHODS"
  for m in "${order[@]}"; do
    [ -n "${methods[$m]+set}" ] || { echo "unknown method \`$m\`; known: ${!methods[*]}" >&2; exit 2; }
  done
fi
epochs_tag=""
epochs_set=()
if [ -n "${EPOCHS:-}" ]; then
  epochs_tag="-e$EPOCHS"
  epochs_set=(--set "train.epochs=$EPOCHS")
fi
dirs=()
for m in "${order[@]}"; do
  dir="runs/mini-vlcl/$m$epochs_tag-seed$seed"
  dirs+=("$dir")
  if [ -f "$dir/summary.json" ]; then continue; fi
  if [ -f "$dir/progress.json" ]; then
    "$recall" run -q --resume "$dir"
    continue
  fi
  args=(--set "experiment.seed=$seed" --set "experiment.method=$m$epochs_tag" "${epochs_set[@]}")
  file=experiments/mini-vlcl/mini-vlcl.toml
  if [[ "${methods[$m]}" == file:* ]]; then
    file="${methods[$m]#file:}"
  else
    IFS='|' read -ra sets <<< "${methods[$m]}"
    for s in "${sets[@]}"; do [ -n "$s" ] && args+=(--set "$s"); done
  fi
  echo "== $m"
  start=$(date +%s)
  "$recall" run -q "$file" "${args[@]}" --run-dir "$dir"
  echo "   $(( $(date +%s) - start )) s"
done
# Deltas against fine-tuning when it is among the methods run.
baseline=()
for m in "${order[@]}"; do [ "$m" = finetune ] && baseline=(--baseline "finetune$epochs_tag"); done
"$recall" compare "${dirs[@]}" "${baseline[@]}" --out runs/mini-vlcl
