"""Reranker pieces without a process group: model heads, losses vs stock, mining selection, config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dist_vdr.config import (
    LossConfig,
    MiningConfig,
    ModelConfig,
)
from dist_vdr.config import load_config as _load_config
from dist_vdr.kinds.reranker.config import RerankerConfig


def load_config(path=None, overrides=()):
    """Value checks only: the recipes' demo paths need not exist here (tests/unit/test_config.py tests them)."""
    return _load_config(path, overrides, check_paths=False)


def _rows(pages, n=4):
    import datasets

    ds = datasets.load_from_disk(str(pages))["train"].select(range(n))
    return [list(ds[c]) for c in ("query", "image", "negative_0", "negative_1")]


def _reranker(path, **kw):
    from dist_vdr.kinds.reranker.model import build_reranker

    return build_reranker(ModelConfig(name_or_path=str(path)), RerankerConfig(**kw))


def test_tiny_reranker_reads_query_and_page_and_scores_one_logit(tiny_reranker, pages):
    from sentence_transformers.cross_encoder.modules import LogitScore

    from dist_vdr.kinds.tiny import is_tiny_model

    assert is_tiny_model(tiny_reranker, "reranker") and not is_tiny_model(tiny_reranker, "embedding")
    model = _reranker(tiny_reranker)
    tok = model[0].tokenizer
    assert isinstance(model[1], LogitScore)
    assert (model[1].true_token_id, model[1].false_token_id) == (tok.convert_tokens_to_ids("1"),
                                                                  tok.convert_tokens_to_ids("0"))
    queries, positives, _, _ = _rows(pages, 2)
    feats = model.preprocess(list(zip(queries, positives, strict=True)))
    text = tok.decode(feats["input_ids"][0])
    assert f"Query: {queries[0]}" in text and "Document: <|vision_start|><|image_pad|>" in text
    assert text.index("Document: ") < text.index("Query: ")  # page first: computed as an embedding model does
    assert text.rstrip().endswith("<|im_start|>assistant")  # the next token is the answer LogitScore reads
    prompted = tok.decode(model.preprocess([(queries[0], positives[0])], prompt="Is it the page?")["input_ids"][0])
    assert "Is it the page?" in prompted and "Judge whether" not in prompted


def test_dense_head_starts_as_the_logit_score(tiny_reranker, pages):
    queries, positives, negatives, _ = _rows(pages)
    pairs = list(zip(queries, positives, strict=True)) + list(zip(queries, negatives, strict=True))
    logit = _reranker(tiny_reranker, head="logit_score").predict(pairs, activation_fn=torch.nn.Identity())
    dense_model = _reranker(tiny_reranker, head="dense")
    assert type(dense_model[-1]).__name__ == "Dense" and dense_model.num_labels == 1
    dense = dense_model.predict(pairs, activation_fn=torch.nn.Identity())
    assert np.allclose(logit, dense, atol=1e-5), (logit, dense)
    assert np.ptp(logit) > 1e-4  # the scores differ between pairs: the comparison means something


def test_multi_token_answer_is_refused(tiny_reranker):
    with pytest.raises(ValueError, match="single-token"):
        _reranker(tiny_reranker, head="logit_score", true_token="relevant page")


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_cached_bce_equals_stock_bce_on_the_expanded_pairs(tiny_reranker, pages):
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    from dist_vdr.kinds.reranker.loss import build_reranker_loss

    model = _reranker(tiny_reranker)
    q, p, n0, n1 = _rows(pages)
    cached = build_reranker_loss(model, LossConfig(name="bce", mini_batch_size=3, pos_weight=2.0))
    loss = cached([q, p, n0, n1], None)
    loss.backward()
    ours = _grads(model)
    model.zero_grad()
    stock = BinaryCrossEntropyLoss(model, pos_weight=torch.tensor(2.0))
    labels = torch.tensor([1.0] * 4 + [0.0] * 8)
    ref = stock([q * 3, p + n0 + n1], labels)
    ref.backward()
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-5)
    ref_grads = _grads(model)
    assert (ours - ref_grads).norm() / ref_grads.norm() < 1e-4


def test_listwise_loss_is_a_softmax_over_positive_and_hard_negatives(tiny_reranker, pages):
    from dist_vdr.kinds.reranker.loss import build_reranker_loss

    model = _reranker(tiny_reranker)
    q, p, n0, n1 = _rows(pages)
    results = []
    for mini_batch in (2, 100):  # gradient caching: mini-batch size changes nothing
        loss = build_reranker_loss(model, LossConfig(name="listwise", mini_batch_size=mini_batch))([q, p, n0, n1], None)
        loss.backward()
        results.append((loss.item(), _grads(model)))
        model.zero_grad()
    with torch.no_grad():
        scores = torch.stack([torch.from_numpy(model.predict(list(zip(q, c, strict=True)),
                                                             activation_fn=torch.nn.Identity()))
                              for c in (p, n0, n1)], dim=1)
    expected = torch.nn.functional.cross_entropy(scores, torch.zeros(4, dtype=torch.long)).item()
    assert math.isclose(results[0][0], expected, rel_tol=1e-5)
    assert math.isclose(results[0][0], results[1][0], rel_tol=1e-6)
    # Padding differs with the batch composition: equal up to float rounding, not bit for bit.
    a, b = results[0][1], results[1][1]
    assert (a - b).norm() / a.norm() < 1e-4, float((a - b).norm() / a.norm())


def test_negative_selection_skips_the_positive_the_first_ranks_and_the_margin():
    from dist_vdr.retrieval.mining import score_limit, select_negatives

    idx = np.array([[5, 1, 2, 3, 4, -1], [0, 1, 2, 3, 4, 6], [9, 8, -1, -1, -1, -1]])
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, -np.inf], [0.9, 0.85, 0.8, 0.7, 0.6, 0.5],
                       [0.5, 0.4, -np.inf, -np.inf, -np.inf, -np.inf]])
    positives = np.array([1, 0, 9])
    pos_scores = np.array([0.8, 0.9, 0.5])
    negs, ranks, ok = select_negatives(scores, idx, positives, pos_scores,
                                       MiningConfig(num_negatives=2, rank_start=1, max_rank=5))
    assert negs[0].tolist() == [2, 3] and ranks[0].tolist() == [1, 2]  # 5 is rank 0 (skipped), 1 is the positive
    assert negs[1].tolist() == [2, 3]
    assert ok.tolist() == [True, True, False]  # row 2 has only one non-positive page
    negs, _, ok = select_negatives(scores, idx, positives, pos_scores,
                                   MiningConfig(num_negatives=2, rank_start=0, max_rank=5, margin=0.15))
    assert negs[0].tolist() == [3, 4]  # 5 (0.9) and 2 (0.7 > 0.8 - 0.15) are too close to the positive
    assert negs[1].tolist() == [3, 4] and ok.tolist() == [True, True, False]
    # Positive-aware (TopK-PercPos): below 0.85 x the positive's score; the skipped ones are counted
    stats: dict = {}
    negs, _, _ = select_negatives(scores, idx, positives, pos_scores,
                                  MiningConfig(num_negatives=2, rank_start=0, max_rank=5, max_score_ratio=0.85),
                                  stats=stats)
    assert negs[0].tolist() == [3, 4]  # 0.9 and 0.7 >= 0.85 x 0.8 = 0.68
    assert negs[1].tolist() == [3, 4]  # 0.85, 0.8 >= 0.765
    assert stats["too_close"] == 2 + 2 + 0 and stats["relevant"] == 0
    assert score_limit(-0.2, MiningConfig(max_score_ratio=0.9)) == -0.2  # a negative positive score: below it
    assert score_limit(0.5, MiningConfig(margin=0.05, max_score_ratio=0.95)) == pytest.approx(0.45)
    documents = np.full(10, -1)
    documents[[1, 2, 0, 3]] = [7, 7, 8, 8]  # page 2 shares the document of row 0's positive (1); 3 that of row 1's (0)
    negs, ranks, _ = select_negatives(scores, idx, positives, pos_scores,
                                      MiningConfig(num_negatives=2, rank_start=0, max_rank=5), documents)
    assert negs[0].tolist() == [5, 3] and ranks[0].tolist() == [0, 1]  # 2 skipped without taking a rank
    assert negs[1].tolist() == [1, 2]


def test_mined_rows_record_why_each_negative_was_kept():
    from dist_vdr.retrieval.mining import NEGATIVE_MARGINS, RETRIEVER_SCORES, audit_columns

    cols = audit_columns(np.array([[0, 3], [1, -1]]), np.array([[0.8, 0.7, 0.5], [0.6, 0.65, 0.1]]))
    assert cols["negative_ranks"] == [[0, 3], [1, -1]]
    assert np.allclose(cols[RETRIEVER_SCORES], [[0.8, 0.7, 0.5], [0.6, 0.65, 0.1]])
    assert np.allclose(cols[NEGATIVE_MARGINS], [[0.1, 0.3], [-0.05, 0.5]])  # row 1's first: above its positive


def test_mining_outputs_never_replace_an_input_or_a_folder_of_the_user(tmp_path):
    """mine-negatives / score-rows replace --out whole: refused when it is, holds or lies inside an input,
    or is a folder that is not one of their outputs; an earlier output (its marker) or a new path is fine."""
    from dist_vdr.retrieval.mining import MARKER_FILE, check_out

    data, mine = tmp_path / "data", tmp_path / "mined"
    (data / "train").mkdir(parents=True)
    for out in (data, data / "train" / "x", tmp_path):
        with pytest.raises(ValueError, match="(is|contains|lies inside) the input --data"):
            check_out(out, {"--data": str(data), "--teacher": "org/hub-model"})
    (tmp_path / "yours").mkdir()
    (tmp_path / "yours" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an output of `mine-negatives`"):
        check_out(tmp_path / "yours", {"--data": str(data)})
    mine.mkdir()
    (mine / MARKER_FILE).write_text("{}")
    for out in (mine, tmp_path / "new", tmp_path / "empty"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        check_out(out, {"--data": str(data), "--teacher": "org/hub-model"})
    (tmp_path / "link").symlink_to(mine)
    with pytest.raises(ValueError, match="is a symbolic link"):
        check_out(tmp_path / "link", {"--data": str(data)})


def test_an_output_is_written_through_a_folder_of_its_own(tmp_path):
    """save_atomic / write_mined never use a fixed sibling name: a user's <out>.tmp or <out>.parts (an
    input, even) stays untouched, and the written folder has the umask's permissions, not mkdtemp's 0700."""
    import datasets

    from dist_vdr.retrieval.mining import MARKER_FILE, save_atomic

    for sibling in ("rows.tmp", "rows.parts"):
        (tmp_path / sibling).mkdir()
        (tmp_path / sibling / "data.arrow").write_text("the user's")
    out = save_atomic(datasets.Dataset.from_dict({"a": [1, 2]}), tmp_path / "rows", {"k": 1})
    assert datasets.load_from_disk(str(out))["a"] == [1, 2] and (out / MARKER_FILE).is_file()
    for sibling in ("rows.tmp", "rows.parts"):
        assert (tmp_path / sibling / "data.arrow").read_text() == "the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows", "rows.parts", "rows.tmp"]  # no leftovers
    assert out.stat().st_mode & 0o055 == 0o055 & ~_umask()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_row_without_a_page_is_one_line_error():
    import datasets

    from dist_vdr.retrieval.mining import hash_pages

    ds = datasets.Dataset.from_dict({"image": [b"a", b"b"], "negative_0": [b"c", None]})
    with pytest.raises(ValueError, match="row 1 has no page in column 'negative_0'"):
        hash_pages(ds, ["image", "negative_0"])


def test_page_table_deduplicates_by_content(pages):
    import datasets

    from dist_vdr.retrieval.mining import hash_pages, pages_dataset

    ds = datasets.load_from_disk(str(pages))["train"].select(range(6))
    ds = datasets.concatenate_datasets([ds, ds.select([0, 1])])  # rows 6, 7 repeat rows 0, 1
    cells, hashes = hash_pages(ds, ["image", "negative_0"])
    assert cells[6].tolist() == cells[0].tolist() and cells[7].tolist() == cells[1].tolist()
    assert len(hashes) == len(set(hashes)) == len(np.unique(cells))
    table = pages_dataset(ds, ["image", "negative_0"], cells)
    assert len(table) == len(hashes)
    for row in range(len(ds)):
        for c, column in enumerate(["image", "negative_0"]):
            assert np.array_equal(np.asarray(table[int(cells[row, c])]["image"]), np.asarray(ds[row][column]))


def test_listwise_loss_with_retrieval_scores_learns_the_residual(tiny_reranker, pages):
    """With retrieval_score_weight w the softmax is over reranker score + w x retriever score per pair;
    the retriever's scores are constants (no gradient), shifted logits change the loss and gradients."""
    from dist_vdr.kinds.reranker.loss import build_reranker_loss

    model = _reranker(tiny_reranker)
    q, p, n0, n1 = _rows(pages)
    prior = torch.tensor([[0.9, 0.1, -0.2], [0.3, 0.5, 0.0], [0.2, 0.2, 0.2], [-0.1, 0.4, 0.8]])
    cfg = LossConfig(name="listwise", mini_batch_size=3)
    with torch.no_grad():
        scores = torch.stack([torch.from_numpy(model.predict(list(zip(q, c, strict=True)),
                                                             activation_fn=torch.nn.Identity()))
                              for c in (p, n0, n1)], dim=1)
    target = torch.zeros(4, dtype=torch.long)
    loss = build_reranker_loss(model, cfg, retrieval_score_weight=20.0)([q, p, n0, n1], list(prior))
    assert math.isclose(loss.item(), torch.nn.functional.cross_entropy(scores + 20 * prior, target).item(),
                        rel_tol=1e-5)
    loss.backward()
    with_prior = _grads(model)
    model.zero_grad()
    build_reranker_loss(model, cfg)([q, p, n0, n1], None).backward()
    assert (with_prior - _grads(model)).norm() > 1e-3 * with_prior.norm()
    model.zero_grad()
    # A weight of 0 ignores the scores; a weight without them, or of the wrong shape, is refused.
    plain = build_reranker_loss(model, cfg, retrieval_score_weight=0.0)([q, p, n0, n1], list(prior))
    assert math.isclose(plain.item(), torch.nn.functional.cross_entropy(scores, target).item(), rel_tol=1e-5)
    with pytest.raises(ValueError, match="retriever's scores"):
        build_reranker_loss(model, cfg, retrieval_score_weight=1.0)([q, p, n0, n1], None)
    with pytest.raises(ValueError, match="mine again"):
        build_reranker_loss(model, cfg, retrieval_score_weight=1.0)([q, p, n0, n1], list(prior[:, :2]))


def test_reranker_config_defaults_and_refusals():
    cfg = load_config("configs/tiny-reranker.yaml")
    assert cfg.task == "reranker" and cfg.loss.name == "listwise" and cfg.training.batch_sampler == "batch_sampler"
    assert cfg.reranker.retrieval_score_weight == 20  # the tiny recipe is a residual reranker
    assert load_config(None, ["task=reranker"]).loss.name == "bce"  # auto
    assert load_config("configs/tiny.yaml").training.batch_sampler == "no_duplicates_hashed"
    listwise = load_config("configs/tiny-reranker.yaml", ["loss.name=listwise", "loss.num_in_batch_negatives=2",
                                                          "reranker.retrieval_score_weight=0"])
    assert listwise.training.batch_sampler == "no_duplicates_hashed"
    with pytest.raises(ValueError, match="is not a loss of task=reranker"):
        load_config("configs/tiny-reranker.yaml", ["loss.name=cmnrl"])
    with pytest.raises(ValueError, match="is not a loss of task=embedding"):
        load_config("configs/tiny.yaml", ["loss.name=bce"])
    # A shared option only some kinds take is refused for the others, by the kinds' declarations alone.
    with pytest.raises(ValueError, match="loss.pos_weight applies to task=reranker; remove it for task=embedding"):
        load_config("configs/tiny.yaml", ["loss.pos_weight=2"])
    with pytest.raises(ValueError, match="matryoshka_dims"):
        load_config("configs/tiny-reranker.yaml", ["loss.matryoshka_dims=[16]"])
    with pytest.raises(ValueError, match="max_rank"):
        load_config("configs/tiny-reranker.yaml", ["mining.num_negatives=5", "mining.max_rank=4"])
    with pytest.raises(ValueError, match="retrieval_score_weight"):
        load_config("configs/tiny-reranker.yaml", ["reranker.retrieval_score_weight=1", "loss.name=bce"])
    with pytest.raises(ValueError, match="retrieval_score_weight"):
        load_config("configs/tiny-reranker.yaml", ["reranker.retrieval_score_weight=1", "mining.enabled=false"])
    with pytest.raises(ValueError, match="retrieval_score_weight"):  # in-batch pairs have no retriever score
        load_config("configs/tiny-reranker.yaml", ["loss.num_in_batch_negatives=2"])
    with pytest.raises(ValueError, match=">= 0"):
        load_config("configs/tiny-reranker.yaml", ["reranker.retrieval_score_weight=-1"])
    recipe = load_config("configs/qwen3-vl-reranker-2b-vdr.yaml")
    assert recipe.model.name_or_path == "Qwen/Qwen3-VL-Reranker-2B" and recipe.task == "reranker"


def test_sharded_save_routes_head_weights_to_their_module(tiny_reranker, tmp_path):
    from sentence_transformers import CrossEncoder

    from dist_vdr.engines.gradient_cache import saving_state_dict

    model = _reranker(tiny_reranker, head="dense")
    full = {k: v.clone() for k, v in model.state_dict().items()}
    full["2.linear.weight"] = torch.full_like(full["2.linear.weight"], 0.5)  # what the gathered head holds
    with torch.no_grad():
        model[2].linear.weight.zero_()  # stale local copy (a shard, under ZeRO-3/FSDP2)
    with saving_state_dict(model, full):
        model.save_pretrained(str(tmp_path / "saved"), create_model_card=False)
    loaded = CrossEncoder(str(tmp_path / "saved"), device="cpu")
    assert torch.equal(loaded[2].linear.weight, full["2.linear.weight"])
    assert not hasattr(model[2], "__dict__") or "state_dict" not in model[2].__dict__  # patch removed


def test_rerank_summary_and_headline():
    from dist_vdr import kinds as tasks
    from dist_vdr.kinds.reranker.evaluation import summarise
    from dist_vdr.run.results import Metrics, RunResult

    raw = {"eval_retrieval_ndcg@10": 0.5, "eval_rerank_ndcg@10": 0.7, "eval_runtime": 1.0, "rerank_mrr@10": 0.6}
    assert summarise(raw) == {"retrieval": {"ndcg@10": 0.5}, "rerank": {"ndcg@10": 0.7, "mrr@10": 0.6}}
    result = RunResult(task="reranker", global_step=4, before=Metrics.of(0, {"rerank": {"ndcg@10": 0.4}}),
                       after=Metrics.of(4, summarise(raw)))
    line = tasks.get("reranker").headline(result, "ndcg@10")
    assert line == "NDCG@10 retrieval=0.5000 reranked: before training=0.4000 after=0.7000"


def test_tiny_reranker_starts_from_an_embedding_backbone(tiny_model, tmp_path):
    from safetensors.torch import load_file
    from sentence_transformers import CrossEncoder

    from dist_vdr.kinds.tiny import TinyModelSpec, build_tiny_reranker

    out = build_tiny_reranker(tmp_path / "warm", init_from=tiny_model)
    backbone = load_file(str(tiny_model / "model.safetensors"))
    model = CrossEncoder(str(out), device="cpu")
    inner = model[0].model.model.state_dict()
    assert set(backbone) == set(inner)
    assert all(torch.equal(backbone[k], inner[k]) for k in backbone)
    cold = build_tiny_reranker(tmp_path / "cold")
    assert not torch.equal(CrossEncoder(str(cold), device="cpu")[0].model.model.state_dict()[
        "language_model.layers.0.mlp.up_proj.weight"], backbone["language_model.layers.0.mlp.up_proj.weight"])
    with pytest.raises(ValueError, match="do not fit"):
        build_tiny_reranker(tmp_path / "other", TinyModelSpec(hidden_size=32, head_dim=8), init_from=tiny_model)


def test_deeper_tiny_reranker_starts_as_its_warm_start(tiny_model, pages, tmp_path):
    """Layers beyond the embedding backbone's start as the identity: same hidden states as the shallow one."""
    from sentence_transformers import CrossEncoder

    from dist_vdr.kinds.tiny import TinyModelSpec, build_tiny_reranker

    shallow = CrossEncoder(str(build_tiny_reranker(tmp_path / "two", init_from=tiny_model)), device="cpu")
    deep = CrossEncoder(str(build_tiny_reranker(tmp_path / "four", TinyModelSpec(num_hidden_layers=4),
                                                init_from=tiny_model)), device="cpu")
    assert len(deep[0].model.model.language_model.layers) == 4
    q, p, _, _ = _rows(pages, 2)
    feats = shallow.preprocess(list(zip(q, p, strict=True)))
    hidden = [m[0].model.model(**{k: v for k, v in feats.items() if k not in ("modality", "num_images_per_sample")}
                               ).last_hidden_state for m in (shallow, deep)]
    assert torch.allclose(hidden[0], hidden[1], atol=1e-5)
