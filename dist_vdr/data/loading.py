"""Load training and evaluation data as a recipe describes, and reject bad data before training.

Local folders written by ``save_to_disk`` and hub datasets are both accepted. Problems a user can fix
(a missing column, an empty query, a page image that does not decode, queries that match none of the
qrels) raise ``ValueError`` naming the split, row and column, before any model weights are touched.

Data folders are only read: transforms that ``datasets`` would cache beside a dataset loaded from
disk (``cast``, ``map``) are avoided, since their ``cache-*.arrow`` files are full copies of the pages.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

from dist_vdr.config import DataConfig
from dist_vdr.data.arrow import column_values
from dist_vdr.data.splits import load_pages as load_pages
from dist_vdr.data.splits import load_split as _load_split


@dataclass
class EvalData:
    """Retrieval evaluation set: query texts, a page corpus and graded relevance judgements.

    ``corpus`` is a ``datasets.Dataset`` with ``page_id`` (str) and ``image`` columns: pages stay on
    disk (memory-mapped Arrow) until a rank decodes its own shard.
    """

    queries: dict[str, str]
    corpus: object  # datasets.Dataset[page_id, image]
    qrels: dict[str, dict[str, int]] = field(default_factory=dict)  # query id -> {page id: grade}
    name: str = "eval"
    """What the set is called in benchmark-format results (the eval data's hub configuration or folder)."""

    def relevant_sets(self) -> dict[str, set[str]]:
        return {q: {p for p, g in rel.items() if g > 0} for q, rel in self.qrels.items()}

    def corpus_dict(self) -> dict[str, object]:
        """page id -> decoded PIL image, all in memory (what the stock evaluator wants)."""
        return dict(zip(self.corpus["page_id"], self.corpus["image"], strict=True))


def read_corpus_qrels(qrels_file: str, corpus, corpus_path: str) -> dict[str, dict[str, int]]:
    """Judgements from a file, page ids checked against ``corpus`` and duplicates dropped by
    `pages build` mapped to the page kept."""
    from dist_vdr.data import judgements

    known = set(map(str, column_values(corpus, "page_id")))
    return judgements.resolve_page_ids(judgements.read_qrels(qrels_file), known, judgements.read_aliases(corpus_path))


def _require_columns(ds, columns: list[str], where: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ValueError(f"{where} has no column(s) {missing}; it has {ds.column_names}. Fix data.* column names")


def _check_queries(texts, where: str) -> None:
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where} row {i}: empty query {text!r}; remove or fill the row")


def undecoded(ds, columns: list[str]):
    """``ds`` with the image ``columns`` giving their stored values ({bytes, path}) instead of PIL images.

    ``cast_column`` to an Image feature that differs only in ``decode`` changes the schema alone (the
    Arrow storage is the same); ``Dataset.cast`` would rewrite every page into a cache file in the
    dataset's folder.
    """
    import datasets

    for column in columns:
        ds = ds.cast_column(column, datasets.Image(decode=False))
    return ds


def image_columns(ds, columns: list[str]) -> list[str]:
    import datasets

    return [c for c in columns if isinstance(ds.features.get(c), datasets.Image)]


# The page-size limit of `dist-vdr pages build --max-image-pixels` (PIL's decompression-bomb
# threshold; PIL itself only warns up to twice that, so a 121 MP page used to train).
MAX_PAGE_PIXELS = 89_478_485


def decode_page(value, where: str, feature=None):
    """(page, None), or (None, the problem in one line naming ``where``) for a stored page value.

    The header is read first, so a page above :data:`MAX_PAGE_PIXELS` is refused before it is
    decoded. Without ``feature`` the page is only checked (returned as None); with it, it is
    decoded by that ``datasets.Image`` feature -- the same object the trainer's sampler would hash.
    """
    from PIL import Image

    if value is None:
        return None, f"{where}: no image"
    try:
        with Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]) as im:
            if im.width * im.height > MAX_PAGE_PIXELS:
                return None, (f"{where}: the page is {im.width}x{im.height} = {im.width * im.height / 1e6:.0f} MP, "
                              f"above the {MAX_PAGE_PIXELS / 1e6:.1f} MP page limit; downscale it or drop the row")
            if feature is None:
                im.load()
                return None, None
        return feature.decode_example(value), None
    except Exception as exc:  # any decoder failure is the row's problem, said with its row
        return None, f"{where}: image does not decode ({type(exc).__name__}: {exc}); fix or drop the row"


def check_images(ds, columns: list[str], where: str, show_progress: bool = False) -> None:
    """Decode every page of ``columns`` once; ValueError names the first row that fails."""
    from tqdm.auto import tqdm

    cols = image_columns(ds, columns)
    if not cols:
        return
    raw = undecoded(ds.select_columns(cols), cols)
    for i, row in enumerate(tqdm(raw, desc=f"checking pages of {where}", disable=not show_progress)):
        for c in cols:
            _, problem = decode_page(row[c], f"{where} row {i}, column {c!r}")
            if problem:
                raise ValueError(problem)


def load_train(cfg: DataConfig, show_progress: bool = False, extra_columns: list[str] = ()):
    """The training dataset with exactly ``cfg.train_columns`` (then ``extra_columns``), in that order.

    Page columns may hold page ids resolved against ``cfg.pages_path`` (see :mod:`.page_refs`);
    those are checked to name pages of that corpus, and image columns to decode.
    """
    from dist_vdr.data import page_refs

    ds = _load_split(cfg.path, cfg.train_name, cfg.train_split)
    where = f"training data {cfg.path}[{cfg.train_split}]"
    columns = [*cfg.train_columns, *(c for c in extra_columns if c not in cfg.train_columns)]
    if cfg.max_train_samples is not None:
        ds = ds.select(range(min(cfg.max_train_samples, len(ds))))
    table = page_refs.load_table(cfg) if cfg.pages_path else None
    if table is not None and cfg.pages_path == cfg.path and cfg.pages_id_column in ds.column_names:
        # The rows are the corpus (the VDR layout): name the positive by its row's id too, so that
        # every page column holds ids and the no-duplicates sampler sees a page that is one row's
        # positive and another's negative as the same value.
        ds = ds.remove_columns([cfg.positive_column]).rename_column(cfg.pages_id_column, cfg.positive_column)
    if cfg.negative_ids_column:
        if table is None:
            raise ValueError("data.negative_ids_column needs data.pages_path (the corpus the ids name; for the "
                             "published VDR layout, the training data itself with data.pages_id_column=id)")
        source = [c for c in columns if c not in cfg.negative_columns] + [cfg.negative_ids_column]
        _require_columns(ds, source, where)
        ds = page_refs.expand_negative_ids(ds.select_columns(source), cfg.negative_ids_column, cfg.negative_columns,
                                           table, where)
    _require_columns(ds, columns, where)
    ds = ds.select_columns(columns)
    if len(ds) == 0:
        raise ValueError(f"{where} is empty")
    _check_queries(column_values(ds, cfg.query_column), where)
    page_columns = [cfg.positive_column, *cfg.negative_columns]
    ids = page_refs.id_columns(ds, page_columns)
    if ids and table is None:
        raise ValueError(f"{where}: columns {ids} hold page ids, not images; set data.pages_path to the page "
                         f"corpus they name (e.g. the `dist-vdr pages build` folder they were mined from)")
    if table is not None:
        page_refs.check_ids(ds, ids, table, where)
    if cfg.validate_images:
        check_images(ds, [c for c in cfg.train_columns if c not in ids], where, show_progress)
    return ds


def content_hash(value: dict) -> str:
    """SHA-256 of an undecoded page image (``Image(decode=False)`` value: bytes or a file path)."""
    data = value["bytes"] if value.get("bytes") else Path(value["path"]).read_bytes()
    return hashlib.sha256(data).hexdigest()


def _page_id(value: dict) -> str:
    return "page-" + content_hash(value)[:16]


def load_eval(cfg: DataConfig, show_progress: bool = False) -> EvalData:
    if cfg.eval_format == "beir":
        from dist_vdr.data.beir import beir_tables

        data = ir_eval_data(cfg, *beir_tables(cfg), show_progress=show_progress)
    else:
        data = _load_eval_ir(cfg, show_progress) if cfg.eval_format == "ir" else _load_eval_triplets(cfg, show_progress)
    data.name = set_name(cfg.eval_name or cfg.eval_path or cfg.path)
    return data


def set_name(path_or_name: str) -> str:
    """An eval set's name from its hub configuration or path: the last part, letters, digits, - and _."""
    base = Path(str(path_or_name).rstrip("/")).name or "eval"
    return re.sub(r"[^A-Za-z0-9_-]+", "-", base).strip("-") or "eval"


def _load_eval_ir(cfg: DataConfig, show_progress: bool) -> EvalData:
    import datasets

    from dist_vdr.data import judgements

    corpus_path = cfg.eval_path or cfg.path
    corpus = load_pages(corpus_path, cfg.eval_name, cfg.eval_corpus_split)
    _require_columns(corpus, ["page_id", "image"], f"eval corpus {corpus_path}[{cfg.eval_corpus_split}]")
    if cfg.eval_queries_file:
        texts = judgements.read_queries(cfg.eval_queries_file)
        queries = datasets.Dataset.from_dict({"query_id": list(texts), "query": list(texts.values())})
    else:
        queries = _load_split(corpus_path, cfg.eval_name, cfg.eval_queries_split)
    if cfg.eval_qrels_file:
        read = read_corpus_qrels(cfg.eval_qrels_file, corpus, corpus_path)
        qrels = datasets.Dataset.from_dict({"query_id": [q for q, rel in read.items() for _ in rel],
                                            "page_id": [p for rel in read.values() for p in rel],
                                            "score": [g for rel in read.values() for g in rel.values()]})
    else:
        qrels = _load_split(corpus_path, cfg.eval_name, cfg.eval_qrels_split)
    where = (f"eval queries {cfg.eval_queries_file or f'{corpus_path}[{cfg.eval_queries_split}]'} / qrels "
             f"{cfg.eval_qrels_file or f'{corpus_path}[{cfg.eval_qrels_split}]'}")
    return ir_eval_data(cfg, corpus, queries, qrels, corpus_path, where, show_progress)


def ir_eval_data(cfg: DataConfig, corpus, queries, qrels, corpus_path: str, where: str,
                 show_progress: bool = False) -> EvalData:
    """EvalData from the three tables (page_id + image; query_id + query; query_id + page_id + score),
    checked: queries not empty, ids unique and known, judged queries only."""
    import datasets

    from dist_vdr.data import judgements

    _require_columns(queries, ["query_id", "query"], f"eval queries {corpus_path}[{cfg.eval_queries_split}]")
    _require_columns(qrels, ["query_id", "page_id", "score"], f"eval qrels {corpus_path}[{cfg.eval_qrels_split}]")
    _check_queries(queries["query"], f"eval queries {corpus_path}")
    if cfg.validate_images:
        check_images(corpus, ["image"], f"eval corpus {corpus_path}", show_progress)
    from dist_vdr.data import checks

    qids = [str(q) for q in queries["query_id"]]
    checks.unique_ids(qids, f"eval queries ({where})", "query_id", "query id")
    rel: dict[str, dict[str, int]] = {}
    qrel_columns = qrels.select_columns(["query_id", "page_id", "score"]).to_dict()
    scores = checks.grades(qrel_columns["score"], f"eval qrels ({where})", "score")
    for row, (q, p, grade) in enumerate(zip(qrel_columns["query_id"], qrel_columns["page_id"], scores, strict=True)):
        pages = rel.setdefault(str(q), {})
        if str(p) in pages and pages[str(p)] != grade:
            raise ValueError(f"eval qrels ({where}): row {row} judges query {q!r} page {p!r} {grade}, an earlier row "
                             f"{pages[str(p)]}: keep a single judgement per (query, page) pair")
        pages[str(p)] = grade
    texts = dict(zip(qids, queries["query"], strict=True))
    judged = judgements.judged_queries(qids, rel, where)
    if cfg.max_eval_queries is not None:
        judged = judged[: cfg.max_eval_queries]
    corpus = corpus.select_columns(["page_id", "image"])
    page_ids = [str(p) for p in column_values(corpus, "page_id")]
    checks.unique_ids(page_ids, f"eval corpus {corpus_path}[{cfg.eval_corpus_split}]", "page_id", "page id")
    if not isinstance(corpus.features["page_id"], datasets.Value) or corpus.features["page_id"].dtype != "string":
        # Replaced, not cast: a cast of a dataset loaded from disk writes a copy into its folder.
        corpus = corpus.remove_columns(["page_id"]).add_column("page_id", page_ids).select_columns(["page_id", "image"])
    known = set(page_ids)
    unknown = {p for q in judged for p in rel[q] if p not in known}
    if unknown:
        raise ValueError(f"eval qrels name page ids missing from the corpus, e.g. {sorted(unknown)[:3]}")
    return EvalData(queries={q: texts[q] for q in judged}, corpus=corpus, qrels={q: rel[q] for q in judged})


def _load_eval_triplets(cfg: DataConfig, show_progress: bool) -> EvalData:
    """Published VDR layout: each eval row's positive is relevant; positives and negatives form the corpus."""
    import datasets

    path = cfg.eval_path or cfg.path
    ds = _load_split(path, cfg.eval_name, cfg.eval_split)
    where = f"eval data {path}[{cfg.eval_split}]"
    page_cols = [cfg.positive_column, *cfg.eval_negative_columns]
    _require_columns(ds, [cfg.query_column, *page_cols], where)
    if cfg.max_eval_queries is not None:
        ds = ds.select(range(min(cfg.max_eval_queries, len(ds))))
    _check_queries(column_values(ds, cfg.query_column), where)
    if cfg.validate_images:
        check_images(ds, page_cols, where, show_progress)
    raw = undecoded(ds, page_cols)
    queries, pages, qrels = {}, {}, {}
    for i, row in enumerate(raw):
        qid = f"q{i}"
        queries[qid] = row[cfg.query_column]
        for c in page_cols:
            pid = _page_id(row[c])
            pages.setdefault(pid, row[c])  # same page under several rows: one corpus entry (content hash)
            if c == cfg.positive_column:
                qrels[qid] = {pid: 1}
    corpus = datasets.Dataset.from_dict({"page_id": list(pages), "image": list(pages.values())},
                                        features=datasets.Features({"page_id": datasets.Value("string"),
                                                                    "image": datasets.Image()}))
    return EvalData(queries=queries, corpus=corpus, qrels=qrels)
