#!/usr/bin/env bash
# Held-out NDCG@10 of the demo recipe (configs/tiny.yaml, 2 CPU processes) trained with and without
# loss.false_negatives.id_column=document_id, over several seeds and several held-out sets
# (docs/benchmarks.md#false-negatives). Prints one line per (mode, seed, set) and a summary.
# MODES="plain masked guided" adds masking by a guide (the base model, margin 0.1).
#
# usage: launch/compare_false_negatives.sh WORK_DIR      (SEEDS="1 2 3" SETS="101 102 103" to change)
# Reuses what WORK_DIR already holds (models, data, finished runs): rerun it after an interruption.
set -euo pipefail
WORK=${1:?usage: $0 WORK_DIR}
SEEDS=${SEEDS:-"1 2 3"}
SETS=${SETS:-"101 102 103"}
MODES=${MODES:-"plain masked"}
BIN=${BIN:-.venv/bin}
export PYTHON=${PYTHON:-$BIN/python}
RESULTS="$WORK/results.tsv"
source "$(dirname "$0")/compare_lib.sh"
compare_inputs
for seed in $SEEDS; do
    for mode in $MODES; do
        more=()
        [ "$mode" = masked ] && more=(loss.false_negatives.id_column=document_id)
        [ "$mode" = guided ] && more=(loss.false_negatives.guide="$WORK/tiny-model" loss.false_negatives.margin=0.1)
        compare_train "$WORK/runs/$mode-$seed" data.path="$WORK/pages" training.seed="$seed" "${more[@]}"
        compare_eval "$WORK/runs/$mode-$seed/final" "$mode" "$seed"
    done
done
for mode in $MODES; do
    [ "$mode" = plain ] || compare_summary plain "$mode"
done
