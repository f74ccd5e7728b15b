"""A reranker's scores of (query, page image) pairs: one forward of a batch, and the teacher scores of
mined rows sharded over the ranks.

The rows' pairs are scored in batches of one row's pairs only (as the rerank evaluation does), so a
pair's score does not depend on which rank scores it or with what rows: 1 and 2 ranks write the same
scores (tested). Mining runs the reranker as a plain module on every rank (no sharded engine), so
ranks need no lockstep forwards.
"""

from __future__ import annotations

import numpy as np
import torch

from dist_vdr import distributed
from dist_vdr.retrieval.encode import inference, shard_range, shard_sizes


def forward_scores(model, pairs: list[tuple[str, object]], prompt: str | None) -> torch.Tensor:
    """[len(pairs)] float32 scores of (query text, PIL page) pairs, one forward (caller sets no_grad/eval)."""
    from sentence_transformers.util import batch_to_device

    feats = model.preprocess([(q, im.convert("RGB")) for q, im in pairs], prompt=prompt)
    return model(batch_to_device(feats, model.device))["scores"].float().view(-1).cpu()


def row_scores(model, queries: list[str], pages, cells: np.ndarray, *, batch_size: int = 16,
               prompt: str | None = None, show_progress: bool = True) -> np.ndarray:
    """[Q, k] scores of query i with page ``cells[i, j]`` of ``pages`` (a dataset with an image
    column), collective: the rows are split over the ranks and the scores all-gathered."""
    from tqdm.auto import tqdm

    info = distributed.current()
    n, k = cells.shape
    start, end = shard_range(n, info.rank, info.world_size)
    local = torch.full((end - start, k), float("nan"))
    with inference(model):
        for i in tqdm(range(start, end), desc=f"teacher scores (rank {info.rank})",
                      disable=not (show_progress and info.is_main)):
            for b in range(0, k, batch_size):
                images = pages[[int(c) for c in cells[i, b:b + batch_size]]]["image"]
                local[i - start, b:b + batch_size] = forward_scores(model, [(queries[i], im) for im in images], prompt)
    return distributed.all_gather_rows(local, shard_sizes(n, info.world_size)).numpy()
