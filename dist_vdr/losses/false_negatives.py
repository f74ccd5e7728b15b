"""False negatives of the global batch: candidates that answer the query too, left out of its softmax.

With cross-device negatives every query is scored against W·B·(C-1) pages, and some of them are
relevant to it: the same page rendered twice, another page of the same document, a page the qrels
name. Masking **by id** excludes every candidate whose id is one of the query's positive ids (the id
of its own positive, plus any listed in a ``positive_ids`` column) -- except the query's own
positive, which stays the target.

Ids travel as 64-bit hashes of their strings (0: no id, never matches). The candidates' ids must be
known on every rank, and fetching them with a collective of their own would add one per step: they
are bit-packed into the embeddings' one all-gather instead (:func:`pack` appends each row's id,
reinterpreted as ``8 / itemsize`` values of the embedding dtype, to its embedding; a gather copies
bytes, so the ids come back exact). The queries' own id sets never leave their rank.

The collator (:mod:`dist_vdr.data.id_labels`) puts the ids in the batch's ``label`` tensor,
``[B, (C-1) + K]`` int64: the id of each candidate column of the row (positive, negatives), then up
to K further positive ids (0-padded).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dist_vdr.retrieval import scoring as scorings


def pack(stacked: Tensor, extras: list[Tensor]) -> tuple[Tensor, list[tuple[torch.dtype, int]]]:
    """``stacked`` [C, B, D] embeddings with ``extras`` ([C, B, k] tensors of any dtype: ids, the guide's
    embeddings) appended as raw bytes reinterpreted in ``stacked``'s dtype: [C, B, D + s], and the
    layout :func:`unpack` needs. A gather copies bytes, so the extras come back exact."""
    raw = torch.cat([e.to(stacked.device).contiguous().view(torch.uint8) for e in extras], dim=-1)
    raw = F.pad(raw, (0, (-raw.shape[-1]) % stacked.element_size()))
    return torch.cat([stacked.detach(), raw.view(stacked.dtype)], dim=-1), [(e.dtype, e.shape[-1]) for e in extras]


def unpack(gathered: Tensor, dim: int, layout: list[tuple[torch.dtype, int]]) -> tuple[Tensor, list[Tensor]]:
    """[W, C, B, D + s] -> (embeddings [W, C, B, D] (a view), the extras [W, C, B, k] in their dtypes)."""
    raw = gathered[..., dim:].contiguous().view(torch.uint8)
    out, offset = [], 0
    for dtype, width in layout:
        size = width * torch.empty((), dtype=dtype).element_size()
        out.append(raw[..., offset:offset + size].contiguous().view(dtype))
        offset += size
    return gathered[..., :dim], out


def column_ids(candidate_ids: Tensor) -> Tensor:
    """[B, C-1] candidate ids -> [C, B, 1] per column (the query column carries its positive's id: any
    value would do, it is never read)."""
    return torch.cat([candidate_ids[:, :1], candidate_ids], dim=1).T.contiguous().unsqueeze(-1)


def guide_mask(query: Tensor, candidates: Tensor, targets: Tensor, margin: float, strategy: str,
               scoring: scorings.Scoring | None = None) -> Tensor:
    """[b, N] True where the guide scores candidate j above query i's positive less the margin (GIST:
    absolute ``> pos - margin``, relative ``> pos - |pos| * margin``), never at the positive itself.
    ``query`` [b, Dg], ``candidates`` [N, Dg]: the guide's embeddings, scored by ``scoring`` (None: cosine)."""
    scoring = scorings.resolve(scoring)
    sims = scoring.scores(scoring.represent(query.float()), scoring.represent(candidates.float()))
    rows = torch.arange(len(targets), device=sims.device)
    positive = sims[rows, targets].unsqueeze(1)
    threshold = positive - margin if strategy == "absolute" else positive - positive.abs() * margin
    out = sims > threshold
    out[rows, targets] = False
    return out


def candidate_order(values: Tensor) -> Tensor:
    """[W, C, B, ...] per-row values (ids, guide embeddings) -> [W·B·(C-1), ...] in the loss's candidate
    order (all positives of ranks 0..W-1, then all first negatives, ...)."""
    world, columns, batch, *rest = values.shape
    return values[:, 1:].transpose(0, 1).reshape(world * batch * (columns - 1), *rest)


def mask(query_ids: Tensor, candidates: Tensor, targets: Tensor) -> Tensor:
    """[b, N] True where candidate j carries one of query i's ids (``query_ids`` [b, K], 0 = none), except
    at the query's own positive (``targets`` [b]; -1: a query whose positive is not among the candidates)."""
    hit = (candidates[None, :, None] == query_ids[:, None, :]) & (query_ids[:, None, :] != 0)
    out = hit.any(dim=-1)
    rows = torch.arange(len(targets), device=out.device)
    own = targets >= 0
    out[rows[own], targets[own]] = False
    return out


def query_id_sets(labels: Tensor, num_columns: int) -> Tensor:
    """[B, K] the ids of each local query's positives: its positive column's id, then the listed ones."""
    return torch.cat([labels[:, :1], labels[:, num_columns - 1:]], dim=1)


class Masking:
    """The false negatives of one step's global batch, chunk by chunk of this rank's queries.

    ``ids``: (candidate ids [N] in candidate order, this rank's query id sets [B, K]) or None;
    ``guide``: (the guide's embeddings of this rank's queries [B, Dg], of the candidates [N, Dg]) or None,
    scored by ``scoring`` (None: cosine). A chunk's mask is the same at every Matryoshka dim: computed once, reused.
    """

    def __init__(self, ids: tuple[Tensor, Tensor] | None, guide: tuple[Tensor, Tensor] | None,
                 margin: float = 0.0, strategy: str = "absolute", scoring: scorings.Scoring | None = None) -> None:
        self.ids, self.guide, self.margin, self.strategy = ids, guide, margin, strategy
        self.scoring = scoring
        self._chunks: dict[int, Tensor] = {}
        self.masked: Tensor | int = 0  # candidates masked over the chunks (a tensor: no device sync per chunk)

    def chunk(self, begin: int, end: int, targets: Tensor) -> Tensor:
        if begin not in self._chunks:
            hidden = None
            if self.ids is not None:
                candidate_ids, query_ids = self.ids
                hidden = mask(query_ids[begin:end].to(targets.device), candidate_ids.to(targets.device), targets)
            if self.guide is not None:
                queries, candidates = self.guide
                by_guide = guide_mask(queries[begin:end], candidates, targets, self.margin, self.strategy,
                                      self.scoring)
                hidden = by_guide if hidden is None else hidden | by_guide
            self._chunks[begin] = hidden
            self.masked = self.masked + hidden.sum()
        return self._chunks[begin]


def check_id_source(cfg) -> None:
    """ValueError for a recipe whose false-negative ids cannot be found: ``id_source=pages`` looks them up in the
    one page corpus (data.pages_path) of rows that name pages by id."""
    fn = cfg.loss.false_negatives
    if fn.id_column is not None and fn.id_source == "pages" and cfg.data.datasets:
        raise ValueError("loss.false_negatives.id_source=pages is not available with data.datasets yet (the ids "
                         "are looked up in one page corpus): use id columns in the rows (id_source=rows)")
    if fn.id_column is not None and fn.id_source == "pages" and not cfg.data.pages_path:
        raise ValueError("loss.false_negatives.id_source=pages looks the ids up in the page corpus of rows that "
                         "name pages by id: set data.pages_path (or id_source=rows for id columns in the rows)")
