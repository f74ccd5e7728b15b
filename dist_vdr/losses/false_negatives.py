"""False negatives of the global batch: candidates that answer the query too, left out of its softmax.

With cross-device negatives every query is scored against W·B·(C-1) pages, and some of them are
relevant to it: the same page rendered twice, another page of the same document, a page the qrels
name. Masking **by id** excludes every candidate whose id is one of the query's positive ids (the id
of its own positive, plus any listed in a ``positive_ids`` column) -- except the query's own
positive, which stays the target.

Ids travel as 64-bit hashes of their strings (0: no id, never matches). The candidates' ids must be
known on every rank, and fetching them with a collective of their own would add one per step: they
are bit-packed into the embeddings' one all-gather instead (:func:`pack_ids` appends each row's id,
reinterpreted as ``8 / itemsize`` values of the embedding dtype, to its embedding; a gather copies
bytes, so the ids come back exact). The queries' own id sets never leave their rank.

The collator (:mod:`dist_vdr.data.id_labels`) puts the ids in the batch's ``label`` tensor,
``[B, (C-1) + K]`` int64: the id of each candidate column of the row (positive, negatives), then up
to K further positive ids (0-padded).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _slots(dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    if 8 % size:
        raise ValueError(f"cannot pack 64-bit ids into {dtype} embeddings")
    return 8 // size


def pack_ids(stacked: Tensor, candidate_ids: Tensor) -> Tensor:
    """``stacked`` [C, B, D] embeddings + ``candidate_ids`` [B, C-1] -> [C, B, D + slots]. The query
    column carries its positive's id (any value would do: it is never read)."""
    ids = torch.cat([candidate_ids[:, :1], candidate_ids], dim=1).T.contiguous()  # [C, B]
    bits = ids.to(stacked.device).unsqueeze(-1).view(stacked.dtype)  # [C, B, slots], the same bytes
    return torch.cat([stacked.detach(), bits], dim=-1)


def unpack_ids(gathered: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """[W, C, B, D + slots] -> (embeddings [W, C, B, D] (a view), ids [W, C, B] int64)."""
    slots = _slots(dtype)
    ids = gathered[..., -slots:].contiguous().view(torch.int64).squeeze(-1)
    return gathered[..., :-slots], ids


def candidate_order(ids: Tensor) -> Tensor:
    """[W, C, B] ids -> [W·B·(C-1)] in the loss's candidate order (all positives of ranks 0..W-1, then
    all first negatives, ...)."""
    world, columns, batch = ids.shape
    return ids[:, 1:].transpose(0, 1).reshape(world * batch * (columns - 1))


def mask(query_ids: Tensor, candidates: Tensor, targets: Tensor) -> Tensor:
    """[b, N] True where candidate j carries one of query i's ids (``query_ids`` [b, K], 0 = none), except
    at the query's own positive (``targets`` [b])."""
    hit = (candidates[None, :, None] == query_ids[:, None, :]) & (query_ids[:, None, :] != 0)
    out = hit.any(dim=-1)
    out[torch.arange(len(targets), device=out.device), targets] = False
    return out


def query_id_sets(labels: Tensor, num_columns: int) -> Tensor:
    """[B, K] the ids of each local query's positives: its positive column's id, then the listed ones."""
    return torch.cat([labels[:, :1], labels[:, num_columns - 1:]], dim=1)
