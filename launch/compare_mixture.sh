#!/usr/bin/env bash
# Held-out NDCG@10 per dataset of a two-dataset mixture trained with per-step single-dataset batches
# vs mixed batches (README: Mixtures of datasets; docs/benchmarks.md#mixtures), on 2 CPU processes:
#   data:   the demo's 4000 chart pages + 1000 generated forms (`make-synthetic-pages --style forms`)
#   single: data.mixture=exhaust -- every batch of both datasets once per epoch, each optimizer step's
#           global batch from ONE dataset on both ranks
#   mixed:  data.mixture=mixed   -- the same rows, shuffled together (batches mix the datasets)
# Same rows per epoch, same seeds, EPOCHS epochs; no per-dataset options (cross-device negatives on
# for both), so the two differ only in how the batches are grouped. Each final model is evaluated on
# held-out chart pages (SETS) and held-out forms (FORM_SETS). Prints one line per (mode, seed, set)
# and summaries: all sets, charts only, forms only.
#
# usage: launch/compare_mixture.sh WORK_DIR   (SEEDS="1 2 3" SETS="101" FORM_SETS="201" EPOCHS=2).
#        Reuses what WORK_DIR already holds: rerun it after an interruption.
set -euo pipefail
WORK=${1:?usage: $0 WORK_DIR}
SEEDS=${SEEDS:-"1 2 3"}
SETS=${SETS:-"101"}
FORM_SETS=${FORM_SETS:-"201"}
EPOCHS=${EPOCHS:-2}
BIN=${BIN:-.venv/bin}
export PYTHON=${PYTHON:-$BIN/python}
RESULTS="$WORK/results.tsv"
source "$(dirname "$0")/compare_lib.sh"
compare_inputs
[ -d "$WORK/forms" ] || "$BIN/dist-vdr" make-synthetic-pages "$WORK/forms" --style forms --num-train 1000 --seed 1
for set in $FORM_SETS; do
    [ -d "$WORK/heldout-$set" ] || "$BIN/dist-vdr" make-synthetic-pages "$WORK/heldout-$set" --style forms \
        --num-train 64 --num-eval-queries 128 --seed "$set"
done
SETS="$SETS $FORM_SETS"
datasets="data.datasets=[{name: charts, path: $WORK/pages}, {name: forms, path: $WORK/forms}]"
for seed in $SEEDS; do
    for mode in single mixed; do
        strategy=exhaust
        [ "$mode" = mixed ] && strategy=mixed
        compare_train "$WORK/runs/$mode-$seed" "$datasets" data.mixture="$strategy" training.seed="$seed" \
            training.num_epochs="$EPOCHS"
        compare_eval "$WORK/runs/$mode-$seed/final" "$mode" "$seed"
    done
done
echo "== all held-out sets"
compare_summary mixed single
for set in $SETS; do
    echo "== held-out set $set"
    grep -P "\t$set\t" "$WORK/results.tsv" > "$WORK/results-$set.tsv"
    RESULTS="$WORK/results-$set.tsv" compare_summary mixed single
done
