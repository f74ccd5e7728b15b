#!/usr/bin/env bash
# The throughput issue's side-by-side on one GPU, as one prepared run: `dist-vdr bench train` with the
# Qwen3-VL-2B shapes (random weights, built on the GPU), the stock settings of the anchors and
# dist-vdr's, each in its own process.
#
#   launch/bench_gpu.sh OUT_DIR [more dist-vdr bench train arguments]
#
# WHEELS=DIR installs the wheels of DIR first, offline (a GPU machine without internet: build them
# where pip can reach the registries with `make bench-wheels`, which writes wheels/).
# BENCH_MODEL=tiny BENCH_DEVICE=cpu checks the whole script on a CPU in a minute.
set -euo pipefail
OUT=${1:?usage: launch/bench_gpu.sh OUT_DIR [dist-vdr bench train arguments]}
shift
PYTHON=${PYTHON:-python3}
if [ -n "${WHEELS:-}" ]; then
    "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" -r launch/bench_requirements.txt
    "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e .
fi
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
"$PYTHON" -c "import torch, transformers, sentence_transformers as st; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'sentence-transformers', st.__version__)"
MODEL=${BENCH_MODEL:-qwen3-vl-2b}
if [ "$MODEL" = tiny ]; then
    DEFAULTS=(--global-batch-size 8 --steps 1 --warmup-steps 1 --stock mb1,tok400)
else
    # mb1 is the published recipe (33.6 s/step on an H100), tok6000 the best stock setting; dist-vdr
    # at the same token budget, eager and with compiled blocks (3 more warm-up steps: compilation and
    # recompilation for new shapes). 1 warm-up + 2 measured steps keep the whole run near 8 minutes.
    TOK="loss.mini_batch_size=64,loss.mini_batch_num_tokens=6000"
    DEFAULTS=(--steps 2 --warmup-steps 1 --stock mb1,mb8,tok6000 --ours "tok6000:$TOK"
              --ours "tok6000-compile:$TOK,model.compile=true" --timeout-s 240)
fi
"$PYTHON" -m dist_vdr.cli bench train --model "$MODEL" --device "${BENCH_DEVICE:-auto}" --work-dir "$OUT" \
    "${DEFAULTS[@]}" "$@"
