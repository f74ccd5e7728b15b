"""fast-plaid's index build and search over `dist-vdr bench eval-multi-vector`'s corpus, in fast-plaid's own venv.

Usage: PYTHON fast_plaid_child.py CORPUS_FOLDER INDEX_FOLDER TOP_K   (PYTHON: an interpreter with fast-plaid, e.g.
.venv-fast-plaid/bin/python from `make bench-fast-plaid-venv`; this file imports nothing of dist-vdr).

CORPUS_FOLDER holds doc_tokens.npy (float16 [rows, dim]), doc_offsets.npy (int64 [pages + 1]) and queries.npy
(float32 [Q, Tq, dim], zero rows = padding). Prints one JSON line on stdout: build_s, search_s, peak_rss_gib,
index_bytes, params, ids (per query, best first), scores. fast-plaid's own output goes to stderr. Its parameters
are its defaults (nbits 4, 4 k-means iterations, n_ivf_probe 8, n_full_scores 4096); FP_NBITS, FP_N_IVF_PROBE,
FP_N_FULL_SCORES override them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time


def peak_rss_gib() -> float:
    """VmHWM: this process's own peak (ru_maxrss would carry the parent's over the exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2 ** 20


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    corpus, index_dir, top_k = sys.argv[1], sys.argv[2], int(sys.argv[3])
    # stdout carries the one JSON line: the native library's prints go to stderr.
    stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    import numpy as np
    import torch
    from fast_plaid import search

    tokens = torch.from_numpy(np.load(os.path.join(corpus, "doc_tokens.npy")))
    offsets = np.load(os.path.join(corpus, "doc_offsets.npy"))
    documents = [tokens[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
    queries = []
    for q in np.load(os.path.join(corpus, "queries.npy")):
        real = np.any(q != 0, axis=1)  # zero rows add nothing to MaxSim: dropped
        queries.append(torch.from_numpy(np.ascontiguousarray(q[real] if real.any() else q[:1])))
    params = {"nbits": int(os.environ.get("FP_NBITS", 4)), "kmeans_niters": 4, "max_points_per_centroid": 256,
              "n_ivf_probe": int(os.environ.get("FP_N_IVF_PROBE", 8)),
              "n_full_scores": int(os.environ.get("FP_N_FULL_SCORES", 4096)), "device": "cpu",
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    try:
        import importlib.metadata

        params["fast_plaid"] = importlib.metadata.version("fast-plaid")
    except Exception:  # noqa: BLE001  (the version is only reported)
        pass
    shutil.rmtree(index_dir, ignore_errors=True)
    t0 = time.perf_counter()
    index = search.FastPlaid(index=index_dir, device="cpu")
    index.create(documents_embeddings=documents, nbits=params["nbits"], kmeans_niters=params["kmeans_niters"],
                 max_points_per_centroid=params["max_points_per_centroid"])
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = index.search(queries_embeddings=queries, top_k=top_k, n_ivf_probe=params["n_ivf_probe"],
                           n_full_scores=params["n_full_scores"], batch_size="auto", show_progress=False)
    search_s = time.perf_counter() - t0
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(index_dir) for f in files)
    stdout.write(json.dumps({
        "build_s": build_s, "search_s": search_s, "index_bytes": size, "params": params,
        "peak_rss_gib": peak_rss_gib(),
        "ids": [[int(d) for d, _ in r] for r in results],
        "scores": [[float(s) for _, s in r] for r in results]}) + "\n")
    stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
