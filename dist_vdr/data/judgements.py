"""Read evaluation queries and relevance judgements (qrels) from the file formats people actually have.

Queries (``read_queries``), picked by file extension:

* ``.jsonl`` / ``.json``: one JSON object per line (blank lines skipped). The id is the first present of
  ``query_id``, ``query-id``, ``qid``, ``_id``, ``id``; the text the first present of ``query``, ``text``.
* ``.csv`` / ``.tsv``: a header row naming the same columns (BEIR ``queries.tsv`` works as is).

Qrels (``read_qrels``):

* ``.jsonl`` / ``.json`` / ``.csv`` / ``.tsv``: query id as above; page id the first present of ``page_id``,
  ``doc_id``, ``docid``, ``corpus_id``, ``corpus-id``; grade the first present of ``score``, ``relevance``,
  ``rel``, ``grade`` (1 when there is none). BEIR ``query-id<TAB>corpus-id<TAB>score`` files work as is.
* any other extension (``.trec``, ``.qrels``, ``.txt``): TREC qrels, ``qid iter docid rel`` per line
  (or ``qid docid rel``); blank lines and lines starting with ``#`` are skipped.

Grades are integers; a page is relevant when its grade is > 0. Mistakes a user can fix raise ``ValueError``
naming the file and line, so a bad judgement file fails before any model is loaded.

``judged_queries`` matches queries against qrels: only queries with a relevant page are evaluated (or
mined); when none is, ``ValueError``; when some are not, one warning with the counts and examples.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Container, Iterator, Mapping, Sequence
from pathlib import Path

QUERY_ID_KEYS = ("query_id", "query-id", "qid", "_id", "id")
QUERY_TEXT_KEYS = ("query", "text")
PAGE_ID_KEYS = ("page_id", "doc_id", "docid", "corpus_id", "corpus-id")
GRADE_KEYS = ("score", "relevance", "rel", "grade")
_JSON_SUFFIXES = (".jsonl", ".json")
_TABLE_SUFFIXES = (".csv", ".tsv")
_CORPUS_HINT = "the qrels must name page_id values of the page corpus (see `dist-vdr pages build`)"


def _error(path: Path, lineno: int, problem: str, fix: str) -> ValueError:
    return ValueError(f"{path}, line {lineno}: {problem}; {fix}")


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file; check the path (relative paths are resolved from {Path.cwd()})")
    return path


def _records(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, record)`` from a JSON-lines or CSV/TSV file."""
    # utf-8-sig: spreadsheet exports often start with a byte-order mark that would corrupt the first key.
    with path.open(encoding="utf-8-sig", newline="") as f:
        if path.suffix.lower() in _JSON_SUFFIXES:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise _error(path, lineno, f"not valid JSON ({e.msg})", "write one JSON object per line") from None
                if not isinstance(record, dict):
                    raise _error(path, lineno, f"expected a JSON object, got {type(record).__name__}",
                                 "write one JSON object per line, e.g. {\"query_id\": \"q1\", \"query\": \"...\"}")
                yield lineno, record
        else:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            for row in reader:
                # line_num is the physical line just read, so it matches what an editor shows (header = line 1).
                # Surplus cells land under the key None; header names are stripped of stray spaces.
                yield reader.line_num, {k.strip(): v for k, v in row.items() if k is not None}


def _field(path: Path, lineno: int, record: dict, keys: tuple[str, ...], what: str) -> str:
    """The record's value for the first of ``keys`` it has, as a non-empty string."""
    key = next((k for k in keys if k in record), None)
    if key is None:
        raise _error(path, lineno, f"no {what} field (found {sorted(record)})", f"name it one of {list(keys)}")
    value = record[key]
    # JSON ids are often numbers; str() makes 7 and "7" the same id as they are in TREC files.
    text = "" if value is None else str(value)
    if not text.strip():
        raise _error(path, lineno, f"empty {what} in field {key!r}", f"give every row a non-empty {what}")
    return text


def _grade(path: Path, lineno: int, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        number = float(str(value).strip())
    except ValueError:
        number = float("nan")
    if not number.is_integer():  # nan and 0.5 alike: graded relevance is a small whole number
        raise _error(path, lineno, f"grade {value!r} is not an integer", "use whole numbers such as 0, 1, 2")
    return int(number)


def read_queries(path: str | os.PathLike) -> dict[str, str]:
    """Query id -> query text, in file order."""
    path = _existing(path)
    suffix = path.suffix.lower()
    if suffix not in _JSON_SUFFIXES + _TABLE_SUFFIXES:
        raise ValueError(f"{path}: unsupported query file extension {suffix!r}; "
                         f"use one of {list(_JSON_SUFFIXES + _TABLE_SUFFIXES)}")
    queries: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for lineno, record in _records(path):
        qid = _field(path, lineno, record, QUERY_ID_KEYS, "query id")
        text = _field(path, lineno, record, QUERY_TEXT_KEYS, "query text")
        if qid in queries:
            raise _error(path, lineno, f"query id {qid!r} already defined on line {first_line[qid]}",
                         "give every query a unique id")
        queries[qid], first_line[qid] = text, lineno
    return queries


def _qrels_rows(path: Path) -> Iterator[tuple[int, str, str, int]]:
    """Yield ``(line number, query id, page id, grade)`` from any supported qrels format."""
    if path.suffix.lower() in _JSON_SUFFIXES + _TABLE_SUFFIXES:
        for lineno, record in _records(path):
            qid = _field(path, lineno, record, QUERY_ID_KEYS, "query id")
            pid = _field(path, lineno, record, PAGE_ID_KEYS, "page id")
            grade_key = next((k for k in GRADE_KEYS if k in record), None)
            # No grade column means binary judgements listing only relevant pages.
            grade = 1 if grade_key is None else _grade(path, lineno, record[grade_key])
            yield lineno, qid, pid, grade
        return
    with path.open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) == 4:
                qid, _, pid, grade = fields  # the "iter" column is unused by every TREC tool
            elif len(fields) == 3:
                qid, pid, grade = fields
            else:
                raise _error(path, lineno, f"expected 4 fields, found {len(fields)}",
                             "write TREC qrels as `qid iter docid rel` (or `qid docid rel`) separated by spaces")
            yield lineno, qid, pid, _grade(path, lineno, grade)


def read_qrels(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """Query id -> {page id: grade}; grades may be negative, and only grades > 0 count as relevant."""
    path = _existing(path)
    qrels: dict[str, dict[str, int]] = {}
    first_line: dict[tuple[str, str], int] = {}
    for lineno, qid, pid, grade in _qrels_rows(path):
        pages = qrels.setdefault(qid, {})
        # A repeat is harmless when it agrees; when it disagrees, silently picking one would skew metrics.
        if pid in pages and pages[pid] != grade:
            raise _error(path, lineno, f"query {qid!r} page {pid!r} has grade {grade} but grade {pages[pid]} "
                         f"on line {first_line[qid, pid]}", "keep a single judgement per (query, page) pair")
        pages[pid] = grade
        first_line.setdefault((qid, pid), lineno)
    return qrels


def resolve_page_ids(qrels: Mapping[str, Mapping[str, int]], known_page_ids: Container[str],
                     aliases: Mapping[str, str] | None = None) -> dict[str, dict[str, int]]:
    """Map page ids through ``aliases`` (duplicate -> kept) and check every one is a known corpus page.

    Two ids that collapse onto one page keep the higher grade: a duplicate judged relevant is still relevant.
    """
    aliases = aliases or {}
    resolved: dict[str, dict[str, int]] = {}
    unknown: dict[str, None] = {}  # ordered set, so the examples are the first ones in the qrels
    for qid, pages in qrels.items():
        out = resolved.setdefault(qid, {})
        for pid, grade in pages.items():
            hops = 0
            while pid in aliases and hops < len(aliases):  # follow chains a -> b -> c; the bound stops cycles
                pid, hops = aliases[pid], hops + 1
            out[pid] = max(grade, out[pid]) if pid in out else grade
            if pid not in known_page_ids:
                unknown[pid] = None
    if unknown:
        examples = ", ".join(repr(p) for p in list(unknown)[:3])
        raise ValueError(f"{len(unknown)} page id(s) in the qrels are not in the page corpus (e.g. {examples}); "
                         f"{_CORPUS_HINT}")
    return resolved


def _examples(ids: Sequence[str], n: int = 3) -> str:
    return ", ".join(repr(i) for i in ids[:n]) + (", ..." if len(ids) > n else "")


def judged_queries(query_ids: Sequence[str], qrels: Mapping[str, Mapping[str, int]], where: str) -> list[str]:
    """The ids of ``query_ids`` with at least one relevant page (grade > 0) in ``qrels``, in order.

    No such query: ``ValueError`` with the likely fix (ids that do not match are the usual cause).
    Some queries left out, or qrels for unknown queries: one warning with the counts and examples, so
    a partial mismatch is not silently evaluated on the matching part only.
    """
    if not query_ids:
        raise ValueError(f"{where}: there are no queries; give at least one query with a relevant page")
    relevant = {q for q, pages in qrels.items() if any(g > 0 for g in pages.values())}
    judged = [q for q in query_ids if q in relevant]
    unmatched = [q for q in query_ids if q not in qrels]
    known = set(query_ids)
    orphans = [q for q in qrels if q not in known]
    if not judged and unmatched:
        raise ValueError(f"{where}: none of the {len(query_ids)} queries has a relevant page: {len(unmatched)} "
                         f"query ids match no query id of the qrels (queries: {_examples(unmatched)}; qrels: "
                         f"{_examples(orphans) or 'none'}); give queries and qrels the same query ids")
    if not judged:
        raise ValueError(f"{where}: none of the {len(query_ids)} queries has a page graded > 0 in the qrels; "
                         f"mark relevant pages with a grade of 1 or more")
    if len(judged) < len(query_ids) or orphans:
        unjudged = len(query_ids) - len(judged) - len(unmatched)
        warnings.warn(f"{where}: {len(query_ids) - len(judged)} of {len(query_ids)} queries left out of the metrics "
                      f"and outputs ({len(unmatched)} match no query id of the qrels"
                      f"{f' (e.g. {_examples(unmatched)})' if unmatched else ''}, {unjudged} have no page graded "
                      f"> 0); {len(orphans)} qrels query ids match no query"
                      f"{f' (e.g. {_examples(orphans)})' if orphans else ''}", UserWarning, stacklevel=2)
    return judged


def read_aliases(corpus_dir: str | os.PathLike) -> dict[str, str]:
    """Duplicate page id -> kept page id, from ``<corpus_dir>/duplicates.jsonl`` ({} when there is none)."""
    path = Path(corpus_dir) / "duplicates.jsonl"
    if not path.is_file():
        return {}
    aliases: dict[str, str] = {}
    for lineno, record in _records(path):
        pid = _field(path, lineno, record, ("page_id",), "page id")
        aliases[pid] = _field(path, lineno, record, ("duplicate_of",), "duplicate_of page id")
    return aliases


def _create(path: str | os.PathLike):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return Path(path).open("w", encoding="utf-8")


def write_queries_jsonl(path: str | os.PathLike, queries: Mapping[str, str]) -> None:
    """Write ``{"query_id": ..., "query": ...}`` lines, readable by ``read_queries``."""
    with _create(path) as f:
        for qid, text in queries.items():
            f.write(json.dumps({"query_id": qid, "query": text}, ensure_ascii=False) + "\n")


def write_qrels_trec(path: str | os.PathLike, qrels: Mapping[str, Mapping[str, int]]) -> None:
    """Write TREC ``qid 0 pid grade`` lines, readable by ``read_qrels`` under any non-table extension."""
    with _create(path) as f:
        for qid, pages in qrels.items():
            for pid, grade in pages.items():
                if len(f"{qid} {pid}".split()) != 2:  # whitespace inside an id would shift the columns
                    raise ValueError(f"cannot write ids {qid!r}/{pid!r} to {f.name}: TREC ids must not contain spaces")
                f.write(f"{qid} 0 {pid} {int(grade)}\n")
