"""Eval data in the BEIR layout of the ViDoRe benchmarks (``data.eval_format: beir``).

A folder (or hub dataset) with three tables: ``corpus`` (``corpus-id`` + ``image``), ``queries``
(``query-id`` + ``query``) and ``qrels`` (``query-id``, ``corpus-id``, ``score``), each as a hub
configuration or, on disk, as ``corpus/<split>-*.parquet`` ... (what ``datasets`` writes with
``push_to_hub`` and a hub snapshot holds), or ``corpus.jsonl`` / ``queries.jsonl`` / ``qrels/<split>.tsv``
(the text BEIR files; the corpus must then carry an image column). ``_id`` / ``id`` / ``corpus_id``
spellings are read too. The split: data.eval_split, ``test`` when left at its default.
"""

from __future__ import annotations

from pathlib import Path

from dist_vdr.config import DataConfig

_IDS = {"corpus": ("corpus-id", "corpus_id", "_id", "id", "page_id"),
        "queries": ("query-id", "query_id", "_id", "id")}
_TEXT = ("query", "text", "question")


def split_of(cfg: DataConfig) -> str:
    return "test" if cfg.eval_split == "eval" else cfg.eval_split


def beir_tables(cfg: DataConfig):
    """(corpus, queries, qrels, path, where) of a BEIR folder or hub id, under the names of the ``ir``
    format (page_id + image; query_id + query; query_id + page_id + score)."""
    path, split = cfg.eval_path or cfg.path, split_of(cfg)
    import datasets

    corpus = _table(path, "corpus", split)
    corpus = _rename(corpus, {_first(corpus.column_names, _IDS["corpus"], path, "corpus"): "page_id"})
    _first(corpus.column_names, ("image",), path, "corpus")
    if not isinstance(corpus.features["image"], datasets.Image):  # text BEIR: image paths as values
        if Path(path).is_dir():  # relative to the folder, as the files are shipped
            corpus = corpus.map(lambda r: {"image": str(Path(path) / r["image"])})
        corpus = corpus.cast_column("image", datasets.Image())
    queries = _table(path, "queries", split)
    queries = _rename(queries, {_first(queries.column_names, _IDS["queries"], path, "queries"): "query_id",
                                _first(queries.column_names, _TEXT, path, "queries"): "query"})
    qrels = _table(path, "qrels", split)
    qrels = _rename(qrels, {_first(qrels.column_names, ("query-id", "query_id"), path, "qrels"): "query_id",
                            _first(qrels.column_names, ("corpus-id", "corpus_id", "doc_id"), path, "qrels"): "page_id"})
    if "score" not in qrels.column_names:  # judgements without grades: every listed page is relevant
        qrels = qrels.add_column("score", [1] * len(qrels))
    return (corpus, queries.select_columns(["query_id", "query"]),
            qrels.select_columns(["query_id", "page_id", "score"]), path, f"BEIR eval data {path} ({split})")


def _first(columns: list[str], names: tuple[str, ...], path: str, part: str) -> str:
    found = next((n for n in names if n in columns), None)
    if found is None:
        raise ValueError(f"BEIR eval data {path}: the {part} table has none of the columns {list(names)} (it has "
                         f"{columns}); is this the ViDoRe BEIR layout (corpus/, queries/, qrels/)?")
    return found


def _rename(ds, mapping: dict[str, str]):
    mapping = {a: b for a, b in mapping.items() if a != b}
    drop = [b for b in mapping.values() if b in ds.column_names]
    return (ds.remove_columns(drop) if drop else ds).rename_columns(mapping)


def _table(path: str, part: str, split: str):
    """One table of the folder (parquet shards, or the text BEIR files) or of the hub dataset."""
    import datasets

    folder = Path(path)
    if not folder.is_dir():  # a hub id: the tables are its configurations
        return datasets.load_dataset(path, part, split=split)
    shards = sorted((folder / part).glob(f"{split}-*.parquet"))
    others = sorted({p.name.split("-")[0] for p in (folder / part).glob("*-*-of-*.parquet")})
    if not shards and others:
        raise ValueError(f"BEIR eval data {path}: the {part} table has no split {split!r}, only {others}: set "
                         f"data.eval_split (--eval-split)")
    shards = shards or sorted((folder / part).glob("*.parquet"))  # one unsplit table
    if shards:
        return datasets.Dataset.from_parquet([str(s) for s in shards], keep_in_memory=False)
    if part == "qrels" and (folder / "qrels" / f"{split}.tsv").is_file():
        # Ids as written (strings): "000" must stay "000" to match the queries and the corpus.
        import csv

        with open(folder / "qrels" / f"{split}.tsv", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        return datasets.Dataset.from_dict({c: [r[c] for r in rows] for c in (rows[0] if rows else {})})
    if (folder / f"{part}.jsonl").is_file():
        return datasets.Dataset.from_json(str(folder / f"{part}.jsonl"))
    raise ValueError(f"BEIR eval data {path}: no {part} table ({part}/{split}-*.parquet, {part}/*.parquet"
                     f"{', qrels/' + split + '.tsv' if part == 'qrels' else ', ' + part + '.jsonl'}); is this the "
                     f"ViDoRe BEIR layout?")
