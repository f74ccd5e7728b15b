#!/usr/bin/env bash
# Held-out NDCG@10 of students trained with and without distillation from a teacher trained longer
# (docs/benchmarks.md#distillation), on 2 CPU processes:
#   teacher:  configs/tiny.yaml, TEACHER_EPOCHS epochs (seed 1)
#   scores:   dist-vdr score-rows: the teacher's cosine scores of every training row's positive and
#             negative (the rows of both students, so they differ in the loss only)
#   students: configs/tiny.yaml, STUDENT_EPOCHS epochs, seeds SEEDS, plain vs + loss.distillation
#             (kl, temperature 0.05 = the contrastive loss's scale 20)
# Each evaluated on the held-out sets SETS. Prints one line per (mode, seed, set) and a summary.
#
# usage: launch/compare_distillation.sh WORK_DIR   (SEEDS="1 2 3" SETS="101 102 103" TEACHER_EPOCHS=3
#        STUDENT_EPOCHS=1). Reuses what WORK_DIR already holds: rerun it after an interruption.
set -euo pipefail
WORK=${1:?usage: $0 WORK_DIR}
SEEDS=${SEEDS:-"1 2 3"}
SETS=${SETS:-"101 102 103"}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-3}
STUDENT_EPOCHS=${STUDENT_EPOCHS:-1}
BIN=${BIN:-.venv/bin}
export PYTHON=${PYTHON:-$BIN/python}
RESULTS="$WORK/results.tsv"
source "$(dirname "$0")/compare_lib.sh"
compare_inputs

compare_train "$WORK/runs/teacher" data.path="$WORK/pages" training.seed=1 training.num_epochs="$TEACHER_EPOCHS"
if [ ! -f "$WORK/scored/dist_vdr_mined.json" ]; then
    "$PYTHON" -m accelerate.commands.launch --config_file launch/cpu.yaml --num_processes 2 \
        --main_process_port "${MASTER_PORT:-29500}" -m dist_vdr.cli score-rows --config configs/tiny.yaml \
        --teacher "$WORK/runs/teacher/final" --data "$WORK/pages" --out "$WORK/scored" --device cpu \
        > "$WORK/scored.log" 2>&1
fi
compare_eval "$WORK/runs/teacher/final" teacher 1
for seed in $SEEDS; do
    for mode in plain distill; do
        more=()
        [ "$mode" = distill ] && more=(loss.distillation.scores_column=teacher_scores loss.distillation.kind=kl
                                       loss.distillation.temperature=0.05)
        compare_train "$WORK/runs/$mode-$seed" data.path="$WORK/scored" training.seed="$seed" \
            training.num_epochs="$STUDENT_EPOCHS" "${more[@]}"
        compare_eval "$WORK/runs/$mode-$seed/final" "$mode" "$seed"
    done
done
compare_summary plain distill
