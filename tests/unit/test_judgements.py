"""Query and qrels readers: every accepted format round-trips, and bad files fail naming file and line."""

from __future__ import annotations

import json

import pytest

from dist_vdr.data.judgements import (
    judged_queries,
    read_aliases,
    read_qrels,
    read_queries,
    resolve_page_ids,
    write_qrels_trec,
    write_queries_jsonl,
)

QUERIES = {"q1": "what is the revenue in 2020?", "q2": "chart of \"sales\", by region", "7": "numeric id"}
QRELS = {"q1": {"p1": 2, "p2": 1, "p3": 0}, "q2": {"p4": -1, "p1": 1}}


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# --- queries -----------------------------------------------------------------------------------------------


def test_queries_jsonl_round_trip_keeps_order(tmp_path):
    path = tmp_path / "queries.jsonl"
    write_queries_jsonl(path, QUERIES)
    got = read_queries(path)
    assert got == QUERIES
    assert list(got) == list(QUERIES)


def test_queries_jsonl_alternate_keys_numeric_ids_and_blank_lines(tmp_path):
    path = _write(tmp_path / "q.json", '{"_id": 5, "text": "five"}\n\n{"qid": "a", "query": "A", "id": "x"}\n')
    assert read_queries(path) == {"5": "five", "a": "A"}  # qid wins over the later-listed id key


@pytest.mark.parametrize("suffix, sep", [(".csv", ","), (".tsv", "\t")])
def test_queries_table_formats(tmp_path, suffix, sep):
    path = _write(tmp_path / f"queries{suffix}", f"query_id{sep}query\nq1{sep}first\nq2{sep}second query\n")
    assert read_queries(path) == {"q1": "first", "q2": "second query"}


def test_queries_beir_tsv_header(tmp_path):
    path = _write(tmp_path / "queries.tsv", "query-id\ttext\nq1\thello world\n")
    assert read_queries(path) == {"q1": "hello world"}


def test_queries_csv_quoted_comma(tmp_path):
    path = _write(tmp_path / "q.csv", 'qid,query\nq1,"a, b and c"\n')
    assert read_queries(path) == {"q1": "a, b and c"}


def test_queries_csv_with_byte_order_mark(tmp_path):
    path = tmp_path / "q.csv"
    path.write_bytes("query_id,query\nq1,hello\n".encode("utf-8-sig"))  # what spreadsheet exports write
    assert read_queries(path) == {"q1": "hello"}


def test_queries_unsupported_extension(tmp_path):
    path = _write(tmp_path / "queries.txt", "q1 hello\n")
    with pytest.raises(ValueError, match=r"queries\.txt.*\.jsonl.*\.csv.*\.tsv"):
        read_queries(path)


def test_queries_missing_file(tmp_path):
    with pytest.raises(ValueError, match="nope.jsonl: no such file"):
        read_queries(tmp_path / "nope.jsonl")


def test_queries_missing_text_key_names_keys_found(tmp_path):
    path = _write(tmp_path / "q.jsonl", '{"query_id": "q1", "query": "ok"}\n{"query_id": "q2", "question": "x"}\n')
    with pytest.raises(ValueError, match=r"q\.jsonl, line 2: no query text field.*'question'.*'query', 'text'"):
        read_queries(path)


def test_queries_missing_id_column_csv(tmp_path):
    path = _write(tmp_path / "q.csv", "name,query\nq1,hello\n")
    with pytest.raises(ValueError, match=r"line 2: no query id field.*'name'"):
        read_queries(path)


@pytest.mark.parametrize("text", ["", "   "])
def test_queries_empty_text(tmp_path, text):
    path = _write(tmp_path / "q.jsonl", '{"id": "q1", "query": "ok"}\n\n' + json.dumps({"id": "q2", "query": text}))
    with pytest.raises(ValueError, match=r"line 3: empty query text"):
        read_queries(path)


def test_queries_duplicate_id(tmp_path):
    path = _write(tmp_path / "q.tsv", "qid\tquery\nq1\ta\nq2\tb\nq1\tc\n")
    with pytest.raises(ValueError, match=r"line 4: query id 'q1' already defined on line 2"):
        read_queries(path)


def test_queries_invalid_json_line(tmp_path):
    path = _write(tmp_path / "q.jsonl", '{"id": "q1", "query": "ok"}\n{"id": "q2", \n')
    with pytest.raises(ValueError, match=r"line 2: not valid JSON"):
        read_queries(path)


# --- qrels -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["qrels.trec", "qrels.qrels", "qrels.txt", "qrels"])
def test_qrels_trec_round_trip_keeps_grades(tmp_path, name):
    path = tmp_path / name
    write_qrels_trec(path, QRELS)
    assert path.read_text().splitlines()[0] == "q1 0 p1 2"
    assert read_qrels(path) == QRELS


def test_qrels_trec_three_fields_comments_and_blank_lines(tmp_path):
    path = _write(tmp_path / "qrels.txt", "# header comment\nq1 p1 3\n\n  q1   0  p2  1 \nq2 p1 0\n")
    assert read_qrels(path) == {"q1": {"p1": 3, "p2": 1}, "q2": {"p1": 0}}


def test_qrels_trec_wrong_field_count(tmp_path):
    path = _write(tmp_path / "qrels.trec", "q1 0 p1 1\nq1 p2\n")
    with pytest.raises(ValueError, match=r"qrels\.trec, line 2: expected 4 fields, found 2.*qid iter docid rel"):
        read_qrels(path)


def test_qrels_trec_non_integer_grade(tmp_path):
    path = _write(tmp_path / "qrels.trec", "q1 0 p1 1\nq1 0 p2 high\n")
    with pytest.raises(ValueError, match=r"line 2: grade 'high' is not an integer"):
        read_qrels(path)


def test_qrels_jsonl_grades_and_default(tmp_path):
    lines = [{"query_id": "q1", "page_id": "p1", "score": 2}, {"qid": 3, "doc_id": "p2"},
             {"query-id": "q1", "corpus-id": "p9", "relevance": "-1"}, {"_id": "q4", "docid": "p4", "grade": 1.0}]
    path = _write(tmp_path / "qrels.jsonl", "\n".join(json.dumps(rec) for rec in lines) + "\n")
    assert read_qrels(path) == {"q1": {"p1": 2, "p9": -1}, "3": {"p2": 1}, "q4": {"p4": 1}}


def test_qrels_beir_tsv(tmp_path):
    path = _write(tmp_path / "test.tsv", "query-id\tcorpus-id\tscore\nq1\tp1\t1\nq1\tp2\t2\nq2\tp1\t0\n")
    assert read_qrels(path) == {"q1": {"p1": 1, "p2": 2}, "q2": {"p1": 0}}


def test_qrels_csv_without_grade_column(tmp_path):
    path = _write(tmp_path / "qrels.csv", "query_id,page_id\nq1,p1\nq1,p2\n")
    assert read_qrels(path) == {"q1": {"p1": 1, "p2": 1}}


def test_qrels_missing_page_key(tmp_path):
    path = _write(tmp_path / "qrels.jsonl", '{"query_id": "q1", "page_id": "p1"}\n{"query_id": "q1", "image": "x"}\n')
    with pytest.raises(ValueError, match=r"line 2: no page id field.*'image'.*'page_id'"):
        read_qrels(path)


def test_qrels_repeated_pair_equal_is_fine_conflict_names_both_lines(tmp_path):
    same = _write(tmp_path / "same.trec", "q1 0 p1 1\nq1 0 p1 1\n")
    assert read_qrels(same) == {"q1": {"p1": 1}}
    conflict = _write(tmp_path / "conflict.trec", "q1 0 p1 1\nq1 0 p2 0\nq1 0 p1 2\n")
    with pytest.raises(ValueError, match=r"line 3: query 'q1' page 'p1' has grade 2 but grade 1 on line 1"):
        read_qrels(conflict)


def test_qrels_missing_file(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        read_qrels(tmp_path / "missing.trec")


# --- page id resolution ------------------------------------------------------------------------------------


def test_resolve_page_ids_aliases_keep_max_grade(tmp_path):
    qrels = {"q1": {"dup": 2, "keep": 1, "other": 0}, "q2": {"dup": 0}}
    got = resolve_page_ids(qrels, {"keep", "other"}, aliases={"dup": "keep"})
    assert got == {"q1": {"keep": 2, "other": 0}, "q2": {"keep": 0}}
    assert qrels["q1"]["dup"] == 2  # input left untouched


def test_resolve_page_ids_follows_alias_chains():
    got = resolve_page_ids({"q1": {"a": 1}}, ["c"], aliases={"a": "b", "b": "c"})
    assert got == {"q1": {"c": 1}}
    with pytest.raises(ValueError, match="1 page id"):  # a cycle terminates instead of hanging
        resolve_page_ids({"q1": {"a": 1}}, ["c"], aliases={"a": "b", "b": "a"})


def test_resolve_page_ids_unknown_ids_message():
    qrels = {"q1": {"x1": 1, "ok": 1, "x2": 1}, "q2": {"x3": 0, "x4": 1, "x1": 2}}
    with pytest.raises(ValueError) as info:
        resolve_page_ids(qrels, {"ok"})
    message = str(info.value)
    assert message.startswith("4 page id(s)")
    assert "'x1', 'x2', 'x3'" in message and "x4" not in message
    assert "page_id values of the page corpus (see `dist-vdr pages build`)" in message


def test_read_aliases(tmp_path):
    assert read_aliases(tmp_path) == {}
    lines = '{"page_id": "d1", "duplicate_of": "p1"}\n\n{"page_id": 2, "duplicate_of": 1}\n'
    _write(tmp_path / "duplicates.jsonl", lines)
    assert read_aliases(tmp_path) == {"d1": "p1", "2": "1"}
    _write(tmp_path / "duplicates.jsonl", '{"page_id": "d1"}\n')
    with pytest.raises(ValueError, match=r"duplicates\.jsonl, line 1: no duplicate_of"):
        read_aliases(tmp_path)


# --- queries matched against qrels -------------------------------------------------------------------------


def test_judged_queries_none_matching_is_one_line_error_with_the_fix():
    with pytest.raises(ValueError) as info:
        judged_queries(["q1", "q2"], {"Q1": {"p": 1}, "Q2": {"p": 1}}, "eval files")
    message = str(info.value)
    assert "\n" not in message and message.startswith("eval files: none of the 2 queries has a relevant page")
    assert "'q1', 'q2'" in message and "'Q1', 'Q2'" in message
    assert "give queries and qrels the same query ids" in message
    with pytest.raises(ValueError, match="none of the 1 queries has a page graded > 0"):
        judged_queries(["q1"], {"q1": {"p": 0}}, "eval files")


def test_judged_queries_partial_match_warns_with_counts_and_examples():
    qrels = {"q1": {"p": 1}, "q2": {"p": 0, "r": 2}, "q3": {"p": 0}, "x9": {"p": 1}}
    with pytest.warns(UserWarning) as caught:
        got = judged_queries(["q1", "q2", "q3", "a", "b", "c", "d"], qrels, "eval files")
    assert got == ["q1", "q2"]
    message = str(caught[0].message)
    assert "5 of 7 queries left out of the metrics and outputs (4 match no query id of the qrels " \
           "(e.g. 'a', 'b', 'c', ...), 1 have no page graded > 0); 1 qrels query ids match no query (e.g. 'x9')" \
           in message


def _corpus(tmp_path, n=4):
    import io

    import datasets
    from PIL import Image

    def png(i):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(buf, "PNG")
        return {"bytes": buf.getvalue(), "path": None}

    path = tmp_path / "corpus"
    datasets.Dataset.from_dict({"page_id": [f"p{i}" for i in range(n)], "image": [png(i) for i in range(n)]},
                               features=datasets.Features({"page_id": datasets.Value("string"),
                                                           "image": datasets.Image()})).save_to_disk(str(path))
    return path


def test_eval_files_that_do_not_match_fail_or_warn_while_loading(tmp_path):
    """Before any model is loaded: no judged query is an error naming the ids; some unjudged queries a
    warning, and only judged queries are evaluated."""
    from conftest import run_cli
    from dist_vdr.config import DataConfig
    from dist_vdr.data.loading import load_eval

    corpus = _corpus(tmp_path)
    write_queries_jsonl(tmp_path / "q.jsonl", {"q1": "one", "q2": "two", "q3": "three", "q4": "four"})
    write_qrels_trec(tmp_path / "half.trec", {"q1": {"p0": 1}, "q2": {"p1": 2, "p2": 0}, "q9": {"p3": 1}})
    write_qrels_trec(tmp_path / "none.trec", {"Q1": {"p0": 1}, "Q2": {"p1": 1}})

    def cfg(qrels):
        return DataConfig(path=str(corpus), eval_queries_file=str(tmp_path / "q.jsonl"),
                          eval_qrels_file=str(tmp_path / qrels), validate_images=False)

    with pytest.warns(UserWarning, match=r"2 of 4 queries left out .*\(e\.g\. 'q3', 'q4'\).* 1 qrels query ids"):
        data = load_eval(cfg("half.trec"))
    assert list(data.queries) == ["q1", "q2"] and set(data.qrels) == {"q1", "q2"}
    with pytest.raises(ValueError, match="4 query ids match no query id of the qrels"):
        load_eval(cfg("none.trec"))
    # The command fails on the files, not on the model it would load next (an empty folder: no model).
    (tmp_path / "not-a-model").mkdir()
    done = run_cli(["eval", "--model", str(tmp_path / "not-a-model"), "--data", str(corpus), "--device", "cpu",
                    "--queries", str(tmp_path / "q.jsonl"), "--qrels", str(tmp_path / "none.trec")])
    assert done.returncode == 2
    assert "error:" in done.stderr and "give queries and qrels the same query ids" in done.stderr
