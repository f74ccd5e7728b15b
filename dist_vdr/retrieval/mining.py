"""Hard negatives mined with an embedding model, sharded across ranks.

The evaluator's machinery does the work: the de-duplicated pages of the training data form the
corpus, every rank encodes its own shard (optionally cached on disk, so an interrupted mining run
continues), queries are encoded sharded and all-gathered, and each rank's exact top-k lists are
merged deterministically (score, then content hash). Then, per query, negatives are the best-ranked
pages that are not its positive (same content hash), from ``rank_start`` on, within the top
``max_rank``, and, with a ``margin``, scoring below the positive's score minus the margin, and with
``max_score_ratio``, below that fraction of the positive's score (NV-Retriever's TopK-PercPos; pages
that score as high as the positive are often unlabelled positives). Rows without enough such
pages are dropped and counted. Every mined row records why each negative was kept: its rank, the
retriever's scores and its margin below the positive (:func:`audit_columns`). The result depends
only on the embeddings, not on the number of ranks (tested: 2 ranks write the same dataset as 1).
Scores, representations and the search are those of the retriever's kind (``scoring``, a
:class:`~dist_vdr.retrieval.scoring.Scoring`; cosine by default).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dist_vdr import distributed, log
from dist_vdr.config import MiningConfig
from dist_vdr.data.arrow import column_values
from dist_vdr.data.loading import content_hash, undecoded
from dist_vdr.retrieval.scoring import Scoring

logger = log.get(__name__)

MARKER_FILE = "dist_vdr_mined.json"
# Column of mined rows: the retriever's score (cosine for an embedding model) of the positive, then of each negative.
RETRIEVER_SCORES = "retriever_scores"
# Column of mined rows: the positive's score minus each negative's (the margin the negative was kept at).
NEGATIVE_MARGINS = "negative_margins"
# Column of mined rows (with a teacher): its score of the positive, then of each negative (cosine for an
# embedding teacher, the reranker's score for a reranker).
TEACHER_SCORES = "teacher_scores"
# Column of rows mined over a corpus: the ids of every page judged relevant to the row's query.
RELEVANT_PAGE_IDS = "relevant_page_ids"


@dataclass
class MinedNegatives:
    kept_rows: np.ndarray
    """Training rows that got enough negatives."""
    negatives: np.ndarray
    """[len(kept_rows), num_negatives] indices into ``pages``."""
    ranks: np.ndarray
    """Retrieval rank (0 = best non-positive page) of each chosen negative."""
    scores: np.ndarray
    """[len(kept_rows), 1 + num_negatives] the retriever's score of the positive, then of each negative."""
    pages: object
    """datasets.Dataset[image]: the de-duplicated page table."""
    num_dropped: int
    teacher_scores: np.ndarray | None = None
    """[len(kept_rows), 1 + num_negatives] a teacher's scores of the same pages (``--teacher``), or None."""


def hash_pages(ds, page_columns: list[str]) -> tuple[np.ndarray, list[str]]:
    """De-duplicate the pages of ``page_columns`` by content.

    Returns ([rows, columns] page index of every cell, content hash of every page); pages are
    numbered in order of first occurrence (row by row, column by column).
    """
    raw = undecoded(ds.select_columns(page_columns), page_columns)  # no cast: it writes into the data folder
    index: dict[str, int] = {}
    cells = np.empty((len(raw), len(page_columns)), dtype=np.int64)
    for row, values in enumerate(raw):
        for c, column in enumerate(page_columns):
            if values[column] is None:
                raise ValueError(f"row {row} has no page in column {column!r}: fill or drop such rows first")
            cells[row, c] = index.setdefault(content_hash(values[column]), len(index))
    return cells, list(index)


def score_limit(positive_score: float, cfg: MiningConfig) -> float:
    """Candidates must score below this to be negatives (margin and max_score_ratio; inf without them)."""
    limit = np.inf
    if cfg.margin is not None:
        limit = positive_score - cfg.margin
    if cfg.max_score_ratio is not None:
        limit = min(limit, cfg.max_score_ratio * positive_score if positive_score > 0 else positive_score)
    return limit


def select_negatives(scores: np.ndarray, idx: np.ndarray, positives: np.ndarray, positive_scores: np.ndarray,
                     cfg: MiningConfig, documents: np.ndarray | None = None,
                     relevant: list[set[int]] | None = None,
                     stats: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query, the first ``num_negatives`` eligible pages of its ranking (see the module docstring).

    ``documents``: document code of every page (-1: unknown); pages of the positive's document are
    skipped like the positive itself (they take no rank), and so are the pages of ``relevant[i]``
    (every page judged relevant to the query). Returns (negatives [Q, n], their ranks
    [Q, n], ok [Q]); rows with ok False are to be dropped. ``stats`` (if given) counts the candidates
    passed over as too close to the positive (``too_close``: margin or max_score_ratio) and as of its
    document or judged relevant (``relevant``).
    """
    q = len(idx)
    negatives = np.full((q, cfg.num_negatives), -1, dtype=np.int64)
    ranks = np.full((q, cfg.num_negatives), -1, dtype=np.int64)
    uses: dict[int, int] = {}
    cap = cfg.max_uses_per_page
    counts = stats if stats is not None else {}
    counts.setdefault("too_close", 0)
    counts.setdefault("relevant", 0)
    for i in range(q):
        found, rank = 0, 0
        limit = score_limit(positive_scores[i], cfg)
        for s, j in zip(scores[i], idx[i], strict=True):
            if j < 0 or rank >= cfg.max_rank or found == cfg.num_negatives:
                break
            if j == positives[i]:
                continue
            if (documents is not None and documents[j] >= 0 and documents[j] == documents[positives[i]]) \
                    or (relevant and j in relevant[i]):
                counts["relevant"] += 1
                continue
            if rank >= cfg.rank_start and not s < limit:
                counts["too_close"] += 1
            elif rank >= cfg.rank_start and (cap is None or uses.get(int(j), 0) < cap):
                negatives[i, found], ranks[i, found] = j, rank
                uses[int(j)] = uses.get(int(j), 0) + 1
                found += 1
            rank += 1
    return negatives, ranks, (negatives >= 0).all(axis=1)


def random_negatives(positives: np.ndarray, chosen: np.ndarray, num_pages: int, n: int, seed: int,
                     documents: np.ndarray | None = None, relevant: list[set[int]] | None = None) -> np.ndarray:
    """[Q, n] pages drawn uniformly per row (generator seeded by (seed, row): independent of how rows
    are split over ranks), never the positive, a page of its document or one already chosen; -1
    where the corpus has too few pages."""
    out = np.full((len(positives), n), -1, dtype=np.int64)
    for i, positive in enumerate(positives):
        rng = np.random.default_rng([seed, i])
        taken = {int(j) for j in chosen[i] if j >= 0} | {int(positive)} | (relevant[i] if relevant else set())
        found = 0
        # A short sample nearly always holds n usable pages (O(n) per row, not O(pages)).
        for j in rng.choice(num_pages, size=min(num_pages, 4 * n + len(taken) + 16), replace=False):
            j = int(j)
            if j in taken or (documents is not None and documents[j] >= 0 and documents[j] == documents[positive]):
                continue
            out[i, found] = j
            taken.add(j)
            found += 1
            if found == n:
                break
    return out


def teacher_scores(teacher, queries: list[str], pages, cells: np.ndarray, *, batch_size: int = 16,
                   num_workers: int = -1, show_progress: bool = True, scoring: Scoring | None = None) -> np.ndarray:
    """[Q, k] scores of a teacher embedding model for query i and page ``cells[i, j]`` of ``pages``
    (collective: queries and pages encoded sharded over the ranks, as mining encodes them). ``scoring``:
    the teacher's kind's (None: cosine)."""
    from dist_vdr.retrieval.encode import encode_corpus_shard
    from dist_vdr.retrieval.sharded import encode_queries_sharded

    info = distributed.current()
    encoded = encode_queries_sharded(teacher, queries, info, batch_size=batch_size, scoring=scoring)
    offset, shard = encode_corpus_shard(teacher, pages, rank=info.rank, world_size=info.world_size,
                                        batch_size=batch_size, num_workers=num_workers, cache_dir=None,
                                        show_progress=show_progress and info.is_main, scoring=scoring)
    return _pair_scores(encoded, shard, offset, cells, scoring)


def score_rows(ds, query_column: str, page_columns: list[str], teacher, *, wait_timeout_s: int = 21600) -> np.ndarray:
    """[rows, len(page_columns)] a teacher's scores of each row's query with its own pages (collective;
    ``teacher`` as in :func:`mine`). Pages shared by rows are tabled once (rank 0 hashes them)."""
    info = distributed.current()
    cells, _ = distributed.main_then_share(info.is_main, lambda: hash_pages(ds, page_columns),
                                           timeout_s=wait_timeout_s, waiting_for="rank 0 hashing the pages",
                                           log=lambda msg: logger.info(msg, extra=log.ALL_RANKS))
    return teacher(column_values(ds, query_column), pages_dataset(ds, page_columns, cells), cells)


# long: the split's pages hashed and tabled, mined, and scored by the teacher, each step collective
def mine(model, ds, cfg: MiningConfig, *, query_column: str, positive_column: str, page_columns: list[str],
         batch_size: int = 16, num_workers: int = -1, backend: str = "auto", cache_dir: str | None = None,
         show_progress: bool = True, wait_timeout_s: int = 21600, teacher=None,
         scoring: Scoring | None = None) -> MinedNegatives:
    """Mine for the rows of a training dataset, its own pages as the corpus (collective); every rank
    returns the same result. ``wait_timeout_s``: how long the other ranks wait for rank 0's hashing
    (launch.startup_timeout_s; not inside the step-sized collective timeout). ``teacher``: None, or a
    collective ``(queries, pages, cells) -> [Q, k] scores`` (:func:`teacher_scores` bound to an embedding
    model, or a reranker's ``reranker.scoring.row_scores``) of each kept row's positive and negatives.
    ``scoring``: the retriever's kind's (None: cosine)."""
    info = distributed.current()
    if positive_column not in page_columns:
        page_columns = [positive_column, *page_columns]
    # Rank 0 hashes the pages once (reads every page: minutes at 100k rows); the table is small.
    cells, hashes = distributed.main_then_share(info.is_main, lambda: hash_pages(ds, page_columns),
                                                timeout_s=wait_timeout_s, waiting_for="rank 0 hashing the pages",
                                                log=lambda msg: logger.info(msg, extra=log.ALL_RANKS))
    # Checked before the (long) encoding: a wrong document-id column fails here.
    documents = page_documents(ds, page_columns, cells, cfg.document_id_columns) if cfg.document_id_columns else None
    pages = pages_dataset(ds, page_columns, cells)
    positives = cells[:, page_columns.index(positive_column)]
    queries = column_values(ds, query_column)
    negatives, ranks, ok, scores = mine_pages(model, queries, pages, hashes, positives, cfg,
                                              documents=documents, batch_size=batch_size, num_workers=num_workers,
                                              backend=backend, cache_dir=cache_dir, show_progress=show_progress,
                                              scoring=scoring)
    kept = np.flatnonzero(ok)
    taught = None
    if teacher is not None:
        cells = np.concatenate([positives[kept, None], negatives[kept]], axis=1)
        taught = teacher([queries[i] for i in kept], pages, cells)
    return MinedNegatives(kept_rows=kept, negatives=negatives[kept], ranks=ranks[kept], scores=scores[kept],
                          pages=pages, num_dropped=int((~ok).sum()), teacher_scores=taught)


def mine_pages(model, queries: list[str], pages, page_keys: list[str], positives: np.ndarray, cfg: MiningConfig, *,
               documents: np.ndarray | None = None, relevant: list[set[int]] | None = None, batch_size: int = 16,
               num_workers: int = -1, backend: str = "auto", cache_dir: str | None = None,
               show_progress: bool = True,
               scoring: Scoring | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Negatives for ``queries`` (row i's positive is page ``positives[i]`` of ``pages``), collective.

    ``page_keys``: a unique key per page (content hash or page id) that breaks score ties, so the
    result does not depend on how pages are split over ranks. ``relevant``: per row, every page
    judged relevant to its query (never a negative). Returns (negatives, ranks, ok) as
    :func:`select_negatives`, random negatives appended, and the retriever's scores [Q, 1 + negatives]
    of the positive and of each negative (nan where a row has no negative there): a reranker can
    learn on top of them (``reranker.retrieval_score_weight``). ``scoring``: the retriever's kind's (None:
    cosine): its representations, search and scores.
    """
    from dist_vdr.retrieval.encode import encode_corpus_shard
    from dist_vdr.retrieval.sharded import encode_queries_sharded, global_topk, sorted_position

    info = distributed.current()
    encoded = encode_queries_sharded(model, queries, info, batch_size=batch_size, scoring=scoring)
    # The cache (if any) is keyed by the model, the preprocessing, the pages' contents and the scoring.
    offset, shard = encode_corpus_shard(model, pages, rank=info.rank, world_size=info.world_size,
                                        batch_size=batch_size, num_workers=num_workers, cache_dir=cache_dir,
                                        show_progress=show_progress and info.is_main, scoring=scoring)
    # The positive, and other relevant pages, may take slots of the top k.
    k = cfg.max_rank + 1 + (max(map(len, relevant)) - 1 if relevant else 0)
    scores, idx = global_topk(encoded, shard, offset, k, sorted_position(page_keys),
                              backend=backend, scoring=scoring)
    positive_scores = _pair_scores(encoded, shard, offset, positives[:, None], scoring)[:, 0]
    stats: dict = {}
    negatives, ranks, ok = select_negatives(scores, idx, positives, positive_scores, cfg, documents, relevant, stats)
    logger.info(f"mining: {stats['too_close']} candidates passed over as too close to their positive (margin "
                f"{cfg.margin}, max_score_ratio {cfg.max_score_ratio}), {stats['relevant']} as of its document or "
                f"judged relevant; {int((~ok).sum())} of {len(ok)} rows without enough negatives")
    if cfg.num_random_negatives:
        extra = random_negatives(positives, negatives, len(page_keys), cfg.num_random_negatives, cfg.seed, documents,
                                 relevant)
        negatives = np.concatenate([negatives, extra], axis=1)
        ranks = np.concatenate([ranks, np.full_like(extra, -1)], axis=1)
        ok &= (extra >= 0).all(axis=1)
    # The positives' scores are those computed above (for the margin); only the negatives' are new.
    pair_scores = np.concatenate([positive_scores[:, None], _pair_scores(encoded, shard, offset, negatives, scoring)],
                                 axis=1)
    return negatives, ranks, ok, pair_scores


def pages_dataset(ds, page_columns: list[str], cells: np.ndarray):
    """The page table of :func:`hash_pages` as a dataset with one ``image`` column, page i at row i."""
    import datasets

    first: dict[int, tuple[int, int]] = {}  # page -> (column, row) of its first occurrence
    for row in range(cells.shape[0]):
        for c in range(cells.shape[1]):
            first.setdefault(int(cells[row, c]), (c, row))
    raw = undecoded(ds.select_columns(page_columns), page_columns)  # no cast: it writes into the data folder
    # One selection per column, concatenated (grouped by column), then re-ordered by page index.
    grouped = sorted(first, key=lambda p: (first[p][0], p))
    parts = [_as_image_column(raw.select_columns([col]), col).select(
        [first[p][1] for p in grouped if first[p][0] == c]) for c, col in enumerate(page_columns)]
    pages = datasets.concatenate_datasets([part for part in parts if len(part)])
    position = np.empty(len(first), dtype=np.int64)
    position[np.array(grouped, dtype=np.int64)] = np.arange(len(first))
    return pages.select(position.tolist()).cast_column("image", datasets.Image())


def page_documents(ds, page_columns: list[str], cells: np.ndarray, id_columns: dict[str, str]) -> np.ndarray:
    """Document code of every page (-1 where no id column covers it); codes are equal iff ids are."""
    missing = [c for c in id_columns.values() if c not in ds.column_names]
    unknown = [c for c in id_columns if c not in page_columns]
    if missing or unknown:
        raise ValueError(f"mining.document_id_columns: columns {missing or unknown} are not in the data (page "
                         f"columns {page_columns}, all columns {ds.column_names})")
    codes: dict[str, int] = {}
    documents = np.full(int(cells.max()) + 1 if cells.size else 0, -1, dtype=np.int64)
    for c, column in enumerate(page_columns):
        if column in id_columns:
            for row, doc in enumerate(ds[id_columns[column]]):
                documents[cells[row, c]] = codes.setdefault(str(doc), len(codes))
    return documents


def _as_image_column(ds, column: str):
    return ds if column == "image" else ds.rename_column(column, "image")


def _pair_scores(queries: torch.Tensor, shard: torch.Tensor, offset: int, pages: np.ndarray,
                 scoring: Scoring | None = None) -> np.ndarray:
    """Score (``scoring``'s; None: cosine) of query i with each page ``pages[i, j]`` ([Q, m]; nan where -1);
    the rank holding a page computes its scores, with the candidates' own pair score (the ranking's value
    on any number of ranks)."""
    from dist_vdr.retrieval.search import rescore

    local = torch.zeros(pages.shape, dtype=torch.float32)
    n = shard.shape[0] if shard.numel() else 0
    held = (pages >= offset) & (pages < offset + n)
    for j in range(pages.shape[1]):
        rows = np.flatnonzero(held[:, j])
        if rows.size:
            local[torch.from_numpy(rows), j] = rescore(queries[torch.from_numpy(rows)], shard,
                                                       torch.from_numpy(pages[rows, j] - offset)[:, None],
                                                       scoring=scoring)[:, 0]
    out = distributed.all_gather_same(local).sum(dim=0).numpy()
    out[pages < 0] = np.nan
    return out


def write_mined(ds, mined: MinedNegatives, out: str | Path, *, query_column: str, positive_column: str,
                fingerprint: dict) -> Path:
    """Rows that got negatives, as ``query_column``, ``positive_column``, ``negative_0..n-1`` (+ ranks,
    the retriever's scores),
    written beside ``out`` and renamed into place with a marker holding ``fingerprint``."""
    import datasets

    # Joining columns flattens the row selections into Arrow files, by default beside the source data
    # (a copy of the pages in the user's data folder): they go to a scratch folder beside ``out`` instead.
    # A new hidden folder of its own: never a folder of the user's (a fixed name such as <out>.parts could be).
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{Path(out).name}.parts-", dir=Path(out).parent))
    try:
        base = ds.select_columns([query_column, positive_column]).select(mined.kept_rows.tolist())
        columns = [base.flatten_indices(cache_file_name=str(scratch / "rows.arrow"))]
        for j in range(mined.negatives.shape[1]):
            negative = mined.pages.select(mined.negatives[:, j].tolist()).rename_column("image", f"negative_{j}")
            columns.append(negative.flatten_indices(cache_file_name=str(scratch / f"negative_{j}.arrow")))
        audit = audit_columns(mined.ranks, mined.scores)
        if mined.teacher_scores is not None:
            audit[TEACHER_SCORES] = mined.teacher_scores.astype(np.float32).tolist()
        ranks = datasets.Dataset.from_dict(audit)
        result = datasets.concatenate_datasets([*columns, ranks], axis=1)
        return save_atomic(result, out, {**fingerprint, "rows": len(result), "dropped": mined.num_dropped})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def check_out(out: str | Path, inputs: dict[str, str | None], command: str = "mine-negatives",
              marker_file: str = MARKER_FILE):
    """The guarded ``--out`` (:class:`dist_vdr.outputs.Output`): apart from every input, new, empty or an
    earlier output of these commands (their marker); ValueError with the fix otherwise."""
    from dist_vdr.outputs import Output

    return Output(command, "--out", out, inputs, earlier=(marker_file,)).check()


def save_atomic(ds, out: str | Path, marker: dict, marker_file: str = MARKER_FILE,
                command: str = "mine-negatives") -> Path:
    """``ds`` written into a scratch folder beside ``out``, marked, then renamed into place (a killed write
    leaves no half dataset). Callers check ``out`` with :func:`check_out` before their work."""
    from dist_vdr.outputs import Output

    with Output(command, "--out", out, earlier=(marker_file,), replace_any=True).writing() as tmp:
        ds.save_to_disk(str(tmp))
        (tmp / marker_file).write_text(json.dumps(marker, indent=2))
    return Path(out)


def training_pairs(queries: dict[str, str], qrels: dict[str, dict[str, int]], index: dict[str, int]):
    """One training row per judged query: its highest-graded page is the positive (the first of
    equal grades), every page graded > 0 is kept out of its negatives.

    Returns (query ids, texts, positives [Q] page indices, relevant page sets).
    """
    from dist_vdr.data.judgements import judged_queries

    qids = judged_queries(list(queries), qrels, "mining queries / qrels")  # none: ValueError; some: a warning
    texts, positives, relevant = [], [], []
    for qid in qids:
        rel = {p: g for p, g in qrels[qid].items() if g > 0}
        best = max(rel.values())
        texts.append(queries[qid])
        positives.append(index[next(p for p, g in rel.items() if g == best)])
        relevant.append({index[p] for p in rel})
    return qids, texts, np.array(positives, dtype=np.int64), relevant


def mine_corpus(model, corpus, queries: dict[str, str], qrels: dict[str, dict[str, int]], cfg: MiningConfig, *,
                exclude_same_document: bool = False, teacher=None, scoring: Scoring | None = None,
                **encode_kwargs):
    """Negatives from a page corpus (``page_id``, ``image``, ``document_id``) for judged queries,
    collective. Returns (datasets.Dataset of query_id, query, image = positive page id,
    negative_0..n-1 = page ids, the audit columns, relevant_page_ids; number of queries dropped).
    ``scoring``: the retriever's kind's (None: cosine)."""
    import datasets

    page_ids = [str(p) for p in column_values(corpus, "page_id")]
    index = {p: i for i, p in enumerate(page_ids)}
    qids, texts, positives, relevant = training_pairs(queries, qrels, index)
    documents = None
    if exclude_same_document:
        if "document_id" not in corpus.column_names:
            raise ValueError("--exclude-same-document needs a document_id column in the corpus (pages build writes it)")
        codes: dict[str, int] = {}
        documents = np.array([codes.setdefault(str(d), len(codes)) for d in corpus["document_id"]], dtype=np.int64)
    negatives, ranks, ok, scores = mine_pages(model, texts, corpus.select_columns(["image"]), page_ids, positives,
                                              cfg, documents=documents, relevant=relevant, scoring=scoring,
                                              **encode_kwargs)
    kept = np.flatnonzero(ok)
    columns = {"query_id": [qids[i] for i in kept], "query": [texts[i] for i in kept],
               "image": [page_ids[positives[i]] for i in kept]}
    for j in range(negatives.shape[1]):
        columns[f"negative_{j}"] = [page_ids[negatives[i, j]] for i in kept]
    columns.update(audit_columns(ranks[kept], scores[kept]))
    # Every page the qrels judge relevant to the query, for masking by page id (loss.false_negatives).
    columns[RELEVANT_PAGE_IDS] = [sorted(page_ids[j] for j in relevant[i] | {int(positives[i])}) for i in kept]
    if teacher is not None:
        cells = np.concatenate([positives[kept, None], negatives[kept]], axis=1)
        taught = teacher([texts[i] for i in kept], corpus.select_columns(["image"]), cells)
        columns[TEACHER_SCORES] = taught.astype(np.float32).tolist()
    return datasets.Dataset.from_dict(columns), int((~ok).sum())


def audit_columns(ranks: np.ndarray, scores: np.ndarray) -> dict[str, list]:
    """Why each negative of a mined row was kept, for auditing false-negative risk: its retrieval rank
    (``negative_ranks``, -1 for a random one), the retriever's scores of the positive then of each
    negative (``retriever_scores``) and each negative's margin below the positive (``negative_margins``:
    positive score - its score; near 0 or negative = as close to the query as the positive)."""
    scores = scores.astype(np.float32)
    return {"negative_ranks": ranks.tolist(), RETRIEVER_SCORES: scores.tolist(),
            NEGATIVE_MARGINS: (scores[:, :1] - scores[:, 1:]).tolist()}


def read_marker(path: str | Path, marker_file: str = MARKER_FILE) -> dict | None:
    marker = Path(path) / marker_file
    return json.loads(marker.read_text()) if marker.is_file() else None


def fingerprint(retriever: str, data_path: str, split: str, max_rows: int | None, cfg: MiningConfig) -> dict:
    """What a mined dataset was made from: reused only when all of it matches."""
    return {"retriever": str(retriever), "data": str(data_path), "split": split, "max_rows": max_rows,
            "mining": dataclasses.asdict(cfg), "format": 3}  # 2: with the retriever's scores; 3: and margins
