"""`dist-vdr eval` on a folder in the BEIR layout of the ViDoRe benchmarks (corpus/, queries/, qrels/ parquet
shards, integer ids, hyphenated columns) equals the evaluation of the same data given as dataset splits."""

from __future__ import annotations

import json

import pytest


def test_a_folder_that_is_not_beir_says_what_it_lacks(tmp_path):
    from dist_vdr.config import load_config
    from dist_vdr.data.loading import load_eval

    (tmp_path / "queries").mkdir()
    cfg = load_config(None, [f"data.path={tmp_path}", "data.eval_format=beir"], check_paths=False)
    with pytest.raises(ValueError, match="no corpus table"):
        load_eval(cfg.data)


def test_text_beir_files_and_a_missing_split(pages, tmp_path):
    """queries.jsonl / corpus.jsonl (image paths relative to the folder) / qrels/test.tsv with ids like "000",
    no score column in the parquet variant; a split that is not there is named."""
    import datasets

    from dist_vdr.config import load_config
    from dist_vdr.data.loading import load_eval

    ds = datasets.load_from_disk(str(pages))
    folder = tmp_path / "text"
    (folder / "pages").mkdir(parents=True)
    (folder / "qrels").mkdir()
    corpus, ids = [], {}
    for i, row in enumerate(ds["eval_corpus"].select(range(4))):
        ids[row["page_id"]] = f"{i:03d}"
        row["image"].save(folder / "pages" / f"{i}.png")
        corpus.append({"_id": f"{i:03d}", "image": f"pages/{i}.png"})
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    qrels = [r for r in ds["eval_qrels"] if r["page_id"] in ids]
    texts = dict(zip(ds["eval_queries"]["query_id"], ds["eval_queries"]["query"], strict=True))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{r['query_id']}", "text": texts[r["query_id"]]})
                                                  + "\n" for r in qrels))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{r['query_id']}\t{ids[r['page_id']]}\t1\n" for r in qrels))
    cfg = load_config(None, [f"data.path={folder}", "data.eval_format=beir"], check_paths=False)
    data = load_eval(cfg.data)
    assert sorted(data.corpus["page_id"]) == ["000", "001", "002", "003"] and len(data.queries) == len(qrels)
    assert data.corpus[0]["image"].size == ds["eval_corpus"][0]["image"].size
    assert not list(folder.glob("cache-*"))  # the input folder is only read

    shards = tmp_path / "shards"
    for part, table in (("corpus", datasets.Dataset.from_dict({"corpus-id": [1], "image": [corpus[0]["image"]]})),
                        ("queries", datasets.Dataset.from_dict({"query-id": [7], "query": ["a page"]})),
                        ("qrels", datasets.Dataset.from_dict({"query-id": [7], "corpus-id": [1]}))):
        (shards / part).mkdir(parents=True)
        table.to_parquet(str(shards / part / "dev-00000-of-00001.parquet"))
    with pytest.raises(ValueError, match="no split 'test', only \\['dev'\\]: set data.eval_split"):
        load_eval(load_config(None, [f"data.path={shards}", "data.eval_format=beir"], check_paths=False).data)
