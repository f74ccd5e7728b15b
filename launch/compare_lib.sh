# Shared by launch/compare_*.sh (sourced): the generated inputs, training a run once, its held-out
# NDCG@10, and the paired summary. Each script sets WORK, SEEDS, SETS, BIN, PYTHON before sourcing.

# The tiny model, the demo's 4000 training rows, and one held-out set per seed in SETS (other seeds:
# other renderings of other queries; their eval splits are what is used).
compare_inputs() {
    mkdir -p "$WORK/runs" "$WORK/eval"
    [ -d "$WORK/tiny-model" ] || "$BIN/dist-vdr" make-tiny-model "$WORK/tiny-model"
    [ -d "$WORK/pages" ] || "$BIN/dist-vdr" make-synthetic-pages "$WORK/pages" --num-train 4000
    for set in $SETS; do
        [ -d "$WORK/heldout-$set" ] || "$BIN/dist-vdr" make-synthetic-pages "$WORK/heldout-$set" --num-train 64 \
            --num-eval-queries 128 --seed "$set"
    done
    : > "$RESULTS"
}

# compare_train RUN_DIR key=value...: configs/tiny.yaml on 2 CPU processes unless RUN_DIR/final is complete.
compare_train() {
    local run=$1; shift
    [ -f "$run/final/dist_vdr_complete.json" ] || launch/train.sh launch/cpu.yaml --config configs/tiny.yaml \
        model.name_or_path="$WORK/tiny-model" training.output_dir="$run" evaluation.enabled=false "$@" \
        > "$run.log" 2>&1
}

# compare_eval MODEL LABEL SEED: NDCG@10 (dim 64) of MODEL on every held-out set, one results line each.
compare_eval() {
    local model=$1 label=$2 seed=$3 set out ndcg
    for set in $SETS; do
        out="$WORK/eval/$label-$seed-$set.json"
        [ -s "$out" ] || "$BIN/dist-vdr" eval --model "$model" --data "$WORK/heldout-$set" --device cpu \
            2> "$out.log" | tail -1 > "$out"
        ndcg=$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1]))['dim64_cosine_ndcg@10'])" "$out")
        printf '%s\t%s\t%s\t%s\n' "$label" "$seed" "$set" "$ndcg" | tee -a "$RESULTS"
    done
}

# compare_summary BASE OTHER: mean and spread of each, and OTHER - BASE paired by seed and set.
compare_summary() {
    "$PYTHON" - "$RESULTS" "$1" "$2" <<'PY'
import statistics as st, sys
rows = [line.split("\t") for line in open(sys.argv[1]).read().splitlines()]
by = {(m, s, e): float(v) for m, s, e, v in rows}
base, other = sys.argv[2], sys.argv[3]
for mode in sorted({m for m, _, _ in by}):
    vals = [v for (m, _, _), v in by.items() if m == mode]
    sd = f"{st.stdev(vals):.4f}" if len(vals) > 1 else "-"
    print(f"{mode:8s} NDCG@10 mean {st.mean(vals):.4f}  sd {sd}  (n={len(vals)})")
diffs = [by[(other, s, e)] - by[(base, s, e)] for (m, s, e) in by if m == base and (other, s, e) in by]
print(f"{other} - {base}, paired by seed and set: mean {st.mean(diffs):+.4f}  sd {st.stdev(diffs):.4f}  "
      f"min {min(diffs):+.4f}  max {max(diffs):+.4f}")
seeds = sorted({s for (m, s, _) in by if m == base})
per_seed = [st.mean(by[(other, s, e)] - by[(base, s, e)] for (m, s2, e) in by if m == base and s2 == s)
            for s in seeds]
se = st.stdev(per_seed) / len(per_seed) ** 0.5 if len(per_seed) > 1 else float("nan")
print(f"per seed: {', '.join(f'{d:+.4f}' for d in per_seed)}  -> {st.mean(per_seed):+.4f} +- {se:.4f} (standard error)")
PY
}
