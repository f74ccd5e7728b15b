#!/usr/bin/env bash
# Held-out NDCG@10 of the demo recipe (configs/tiny.yaml, 2 CPU processes) trained with and without
# loss.false_negatives.id_column=document_id, over several seeds and several held-out sets
# (docs/benchmarks.md#false-negatives). Prints one line per (mode, seed, set) and a summary.
#
# usage: launch/compare_false_negatives.sh WORK_DIR      (SEEDS="1 2 3" SETS="101 102 103" to change)
# Reuses what WORK_DIR already holds (models, data, finished runs): rerun it after an interruption.
set -euo pipefail
WORK=${1:?usage: $0 WORK_DIR}
SEEDS=${SEEDS:-"1 2 3"}
SETS=${SETS:-"101 102 103"}
BIN=${BIN:-.venv/bin}
export PYTHON=${PYTHON:-$BIN/python}
mkdir -p "$WORK"
[ -d "$WORK/tiny-model" ] || "$BIN/dist-vdr" make-tiny-model "$WORK/tiny-model"
[ -d "$WORK/pages" ] || "$BIN/dist-vdr" make-synthetic-pages "$WORK/pages" --num-train 4000
for set in $SETS; do  # other seeds: other renderings of other queries (the eval splits are what is used)
    [ -d "$WORK/heldout-$set" ] || "$BIN/dist-vdr" make-synthetic-pages "$WORK/heldout-$set" --num-train 64 \
        --num-eval-queries 128 --seed "$set"
done
mkdir -p "$WORK/runs" "$WORK/eval"
RESULTS="$WORK/results.tsv"
: > "$RESULTS"
for seed in $SEEDS; do
    for mode in plain masked; do
        run="$WORK/runs/$mode-$seed"
        more=()
        [ "$mode" = masked ] && more=(loss.false_negatives.id_column=document_id)
        [ -f "$run/final/dist_vdr_complete.json" ] || launch/train.sh launch/cpu.yaml --config configs/tiny.yaml \
            model.name_or_path="$WORK/tiny-model" data.path="$WORK/pages" training.output_dir="$run" \
            training.seed="$seed" evaluation.enabled=false "${more[@]}" > "$run.log" 2>&1
        for set in $SETS; do
            out="$WORK/eval/$mode-$seed-$set.json"
            mkdir -p "$WORK/eval"
            [ -s "$out" ] || "$BIN/dist-vdr" eval --model "$run/final" --data "$WORK/heldout-$set" --device cpu \
                2> "$out.log" | tail -1 > "$out"
            ndcg=$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1]))['dim64_cosine_ndcg@10'])" "$out")
            printf '%s\t%s\t%s\t%s\n' "$mode" "$seed" "$set" "$ndcg" | tee -a "$RESULTS"
        done
    done
done
"$PYTHON" - "$RESULTS" <<'EOF'
import statistics as st, sys
rows = [line.split("\t") for line in open(sys.argv[1]).read().splitlines()]
by = {(m, s, e): float(v) for m, s, e, v in rows}
for mode in ("plain", "masked"):
    vals = [v for (m, _, _), v in by.items() if m == mode]
    print(f"{mode:7s} NDCG@10 mean {st.mean(vals):.4f}  sd {st.stdev(vals):.4f}  (n={len(vals)})")
diffs = [by[("masked", s, e)] - by[("plain", s, e)] for (m, s, e) in by if m == "plain"]
print(f"masked - plain, paired by seed and set: mean {st.mean(diffs):+.4f}  sd {st.stdev(diffs):.4f}  "
      f"min {min(diffs):+.4f}  max {max(diffs):+.4f}")
EOF
