"""False-negative masking by id in the global-batch loss, one process (no process group).

The multi-rank equivalence (W in {2, 4} ranks = one process with the global batch, the collective
count unchanged, a broken variant caught) is in test_loss_equivalence; here: the ids survive the
gather's packing bit for bit, the mask means what it says, and the loss on one process equals an
explicit computation (softmax over the unmasked candidates), gradients included.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_vdr.config import load_config
from dist_vdr.data import id_labels as row_ids
from dist_vdr.losses import false_negatives as fn
from dist_vdr.losses.global_batch import GlobalBatchCachedMNRL


def test_ids_hash_to_nonzero_64_bit_values():
    assert row_ids.id_hash(None) == row_ids.id_hash("") == 0
    assert row_ids.id_hash("doc/1") == row_ids.id_hash("doc/1") != row_ids.id_hash("doc/2")
    assert row_ids.id_hash(7) == row_ids.id_hash("7") and -(1 << 63) <= row_ids.id_hash("x") < (1 << 63)
    labels = row_ids.id_labels([{"p": "a", "n": "b", "more": ["c", "d"]}, {"p": "b", "n": None, "more": []}],
                          ["p", "n"], "more")
    assert labels.shape == (2, 4) and labels.dtype == torch.int64
    assert labels[1].tolist() == [row_ids.id_hash("b"), 0, 0, 0] and labels[0, 0] == row_ids.id_hash("a")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ids_ride_in_the_embeddings_bit_for_bit(dtype):
    stacked = torch.randn(3, 5, 8).to(dtype)
    ids = torch.randint(-(1 << 62), 1 << 62, (5, 2), dtype=torch.int64)
    ids[0, 0] = 0x7FF8000000000001  # a NaN bit pattern in every float width
    ids[1, 1] = -1
    packed, layout = fn.pack(stacked, [fn.column_ids(ids)])
    gathered = torch.stack([packed, packed.clone()])  # what the all-gather returns: the same bytes
    emb, (back,) = fn.unpack(gathered, stacked.shape[-1], layout)
    back = back.squeeze(-1)
    assert torch.equal(emb[0], stacked) and back.shape == (2, 3, 5)
    assert torch.equal(back[1, 1:].T, ids) and torch.equal(back[0, 0], ids[:, 0])


def test_the_mask_hides_the_queries_ids_but_never_their_own_positive():
    candidates = torch.tensor([5, 6, 5, 0, 7])  # ids in candidate order
    query_ids = torch.tensor([[5, 0], [6, 7], [0, 0]])  # query 2 has no id
    mask = fn.mask(query_ids, candidates, targets=torch.tensor([0, 1, 2]))
    assert mask.tolist() == [[False, False, True, False, False],
                             [False, False, False, False, True],
                             [False, False, False, False, False]]


def _reps(batch: int, columns: int, dim: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, dim, generator=gen, requires_grad=True)] for _ in range(columns)]


def _hidden(labels, num_candidate_columns: int):
    """[queries, candidates] which candidates a query's ids mask (never its own positive)."""
    cand_ids = labels[:, :num_candidate_columns].T.reshape(-1)  # positives, then first negatives, ...
    sets = torch.cat([labels[:, :1], labels[:, num_candidate_columns:]], dim=1)
    hide = ((cand_ids[None, :, None] == sets[:, None, :]) & (sets[:, None, :] != 0)).any(-1)
    own = torch.arange(labels.shape[0])
    hide[own, own] = False
    return hide


def _explicit(reps, labels, dims, scale=20.0):
    """Sum over dims of the mean cross-entropy of each query over its unmasked candidates."""
    q, *cols = [torch.cat(c) for c in reps]
    cand = torch.cat(cols)  # positives, then first negatives, ...
    own = torch.arange(q.shape[0])
    hide = _hidden(labels, len(cols))
    total = 0
    for dim in dims:
        qd, cd = F.normalize(q[:, :dim], dim=-1), F.normalize(cand[:, :dim], dim=-1)
        total = total + F.cross_entropy((qd @ cd.T * scale).masked_fill(hide, float("-inf")), own)
    return total


def _labels(batch: int):
    # rows 0 and 2 share their positive's id; row 1's negative carries row 3's positive id; row 3 lists
    # row 0's negative among its positives
    rows = [{"p": "d0", "n": "x0", "more": []}, {"p": "d1", "n": "d3", "more": []},
            {"p": "d0", "n": "x2", "more": []}, {"p": "d3", "n": "x3", "more": ["x0"]}]
    return row_ids.id_labels(rows[:batch], ["p", "n"], "more")


def test_one_process_equals_the_explicit_masked_softmax(tiny_model):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tiny_model), device="cpu")
    dims = (16, 8)
    loss = GlobalBatchCachedMNRL(model, matryoshka_dims=dims, mini_batch_size=2, mask_same_ids=True)
    plain = GlobalBatchCachedMNRL(model, matryoshka_dims=dims, mini_batch_size=2)
    labels = _labels(4)
    reps = _reps(4, 3, 16)
    got = loss.calculate_loss(reps, labels, with_backward=True)  # as in training: gradients into reps
    grads = [c[0].grad.clone() for c in reps]
    want = _explicit(reps, labels, dims)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    ref = torch.autograd.grad(want, [c[0] for c in reps])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, ref, strict=True))
    unmasked = plain.calculate_loss(reps, None)
    assert abs(unmasked.item() - got.item()) > 1e-3  # the example does hold false negatives

    # What the trainer logs (masked_per_query) and warns about: the count of masked candidates per query,
    # and their share of its 4 x 2 - 1 = 7 negatives, over the calls since the last take.
    hidden = int(_hidden(labels, 2).sum())
    assert hidden == 4 and loss.take_masked_stats() == pytest.approx((hidden / 4, hidden / (4 * 7)))
    assert loss.take_masked_stats() is None and plain.take_masked_stats() is None

    # Ids that collide nowhere change nothing.
    distinct = row_ids.id_labels([{"p": f"d{i}", "n": f"n{i}"} for i in range(4)], ["p", "n"], None)
    assert loss.calculate_loss(reps, distinct).item() == pytest.approx(unmasked.item(), rel=1e-6)
    assert loss.take_masked_stats() == (0.0, 0.0)


def test_a_batch_without_ids_is_one_line_error(tiny_model):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tiny_model), device="cpu")
    loss = GlobalBatchCachedMNRL(model, mask_same_ids=True)
    with pytest.raises(ValueError, match="the batch carries no candidate ids"):
        loss.calculate_loss(_reps(4, 3, 16), None)


def _recipe(pages, *more):
    return load_config("configs/tiny.yaml", [f"data.path={pages}", "data.negative_columns=[negative_0,negative_1]",
                                             *more], check_paths=False)


def test_the_collator_moves_the_ids_into_the_labels(pages):
    from dist_vdr.data.loading import load_train
    from dist_vdr.kinds.embedding.task import EmbeddingTask

    cfg = _recipe(pages, "loss.false_negatives.id_column=document_id")
    task = EmbeddingTask()
    columns = task.extra_columns(cfg)
    assert columns == ["document_id", "negative_0_document_id", "negative_1_document_id"]
    ds = load_train(cfg.data, extra_columns=columns)
    seen = []
    collator = task.wrap_collator(type("Ctx", (), {"cfg": cfg})(), lambda rows: seen.extend(rows) or {})
    batch = collator([ds[i] for i in range(4)])
    assert set(seen[0]) == {"query", "image", "negative_0", "negative_1"}  # the ids never reach the model
    assert batch["label"]["ids"].tolist() == [[row_ids.id_hash(ds[i][c]) for c in columns] for i in range(4)]
    assert set(columns) <= set(collator.valid_label_columns)
    assert task.wrap_collator(type("Ctx", (), {"cfg": _recipe(pages)})(), len) is len  # off: untouched


def _rows_naming_pages(pages, tmp_path):
    """A page corpus (page_id, image, document_id) from the generated rows' positives, and rows naming
    their positive and one negative by page id (+ relevant_page_ids), like `mine-negatives --corpus`."""
    import datasets

    ds = datasets.load_from_disk(str(pages))["train"].select(range(24))
    ids = [f"p{i:03d}" for i in range(len(ds))]
    corpus = ds.select_columns(["image", "document_id"]).add_column("page_id", ids)
    corpus.save_to_disk(str(tmp_path / "corpus"))
    other = [(i + 5) % len(ds) for i in range(len(ds))]
    rows = datasets.Dataset.from_dict({
        "query": ds["query"], "image": ids, "negative_0": [ids[j] for j in other],
        "relevant_page_ids": [[ids[i], ids[(i + 1) % len(ds)]] for i in range(len(ds))],
        # what rows carrying the ids themselves would hold (id_source=rows)
        "document_id": ds["document_id"], "negative_0_document_id": [ds["document_id"][j] for j in other]})
    rows.save_to_disk(str(tmp_path / "rows"))
    return tmp_path / "corpus", tmp_path / "rows"


def test_ids_looked_up_in_the_page_corpus_equal_id_columns_in_the_rows(pages, tmp_path):
    """id_source=pages: rows naming pages by id get each page's document_id from the corpus -- the labels
    equal those of the same rows carrying the id columns; the page columns stay model inputs (not label
    columns: the batches are unchanged); id_column=page_id masks by the page itself, and with
    relevant_page_ids every page the qrels judge relevant. Image columns are refused with the fix."""
    import datasets

    from dist_vdr.data.loading import load_train
    from dist_vdr.kinds.embedding.task import EmbeddingTask

    corpus, rows = _rows_naming_pages(pages, tmp_path)
    task = EmbeddingTask()

    def labels(*more):
        cfg = load_config("configs/tiny.yaml", [f"data.path={rows}", f"data.pages_path={corpus}", *more],
                          check_paths=False)
        task.configure(cfg)
        ds = load_train(cfg.data, extra_columns=task.extra_columns(cfg))
        seen = []
        collator = task.wrap_collator(type("Ctx", (), {"cfg": cfg})(), lambda r: seen.extend(r) or {})
        return collator([ds[i] for i in range(8)])["label"]["ids"], seen, collator

    by_pages, seen, collator = labels("loss.false_negatives.id_column=document_id",
                                      "loss.false_negatives.id_source=pages")
    by_rows, _, _ = labels("loss.false_negatives.id_column=document_id")
    assert torch.equal(by_pages, by_rows) and (by_pages != 0).all()
    assert set(seen[0]) == {"query", "image", "negative_0"}  # page ids, resolved to images by the next collator
    assert not {"image", "negative_0"} & set(collator.valid_label_columns)
    by_page, _, collator = labels("loss.false_negatives.id_column=page_id", "loss.false_negatives.id_source=pages",
                                  "loss.false_negatives.positive_ids_column=relevant_page_ids")
    assert by_page[0].tolist() == [row_ids.id_hash(v) for v in ("p000", "p005", "p000", "p001")]
    assert collator.valid_label_columns[-1] == "relevant_page_ids"
    # By document, the listed relevant pages count by their documents too.
    by_doc, _, _ = labels("loss.false_negatives.id_column=document_id", "loss.false_negatives.id_source=pages",
                          "loss.false_negatives.positive_ids_column=relevant_page_ids")
    docs = datasets.load_from_disk(str(corpus))["document_id"]
    assert by_doc[0, 2:].tolist() == [row_ids.id_hash(docs[0]), row_ids.id_hash(docs[1])]

    with pytest.raises(ValueError, match="set data.pages_path"):
        task.configure(load_config("configs/tiny.yaml", ["loss.false_negatives.id_column=document_id",
                                                         "loss.false_negatives.id_source=pages"], check_paths=False))
    cfg = _recipe(pages, "loss.false_negatives.id_column=document_id", "loss.false_negatives.id_source=pages",
                  f"data.pages_path={corpus}")
    ds = load_train(cfg.data, extra_columns=task.extra_columns(cfg))
    with pytest.raises(ValueError, match="holds images, not page ids"):
        task.wrap_collator(type("Ctx", (), {"cfg": cfg})(), len)([ds[0]])


def test_distillation_refuses_rows_without_negatives_or_scored_for_other_columns(pages, tmp_path):
    """The teacher scores hold one value per page column, in the order they were scored: a recipe that
    trains on other columns, or on none, is refused at load time with the fix."""
    import json

    import datasets

    from dist_vdr.kinds.embedding.task import EmbeddingTask
    from dist_vdr.retrieval.mining import MARKER_FILE

    rows = tmp_path / "scored"
    datasets.load_from_disk(str(pages))["train"].save_to_disk(str(rows))
    (rows / MARKER_FILE).write_text(json.dumps({"columns": ["image", "negative_0", "negative_1"]}))
    distil = "loss.distillation.scores_column=teacher_scores"
    task = EmbeddingTask()
    task.configure(_recipe(rows, distil))  # the scored columns: accepted
    with pytest.raises(ValueError, match="are of the columns"):
        task.configure(_recipe(rows, distil, "data.negative_columns=[negative_1,negative_0]"))
    with pytest.raises(ValueError, match="set data.negative_columns"):
        task.configure(_recipe(rows, distil, "data.negative_columns=[]"))
    with pytest.raises(ValueError, match="named twice"):
        _recipe(rows, "data.negative_columns=[negative_0,negative_0]")


def test_masking_does_not_change_which_rows_are_batched(pages):
    """The id columns are the sampler's label columns: its duplicate check, and so every batch, is the
    same as without them (masking changes the loss only)."""
    from dist_vdr.data.loading import load_train
    from dist_vdr.data.sampler import global_no_duplicates
    from dist_vdr.kinds.embedding.task import EmbeddingTask

    cfg = _recipe(pages, "loss.false_negatives.id_column=document_id")
    task = EmbeddingTask()
    with_ids = load_train(cfg.data, extra_columns=task.extra_columns(cfg))
    plain = load_train(cfg.data)
    labels = task.wrap_collator(type("Ctx", (), {"cfg": cfg})(), None).valid_label_columns
    make = global_no_duplicates(world_size=2)
    a = list(make(with_ids, batch_size=8, drop_last=True, valid_label_columns=labels, seed=3,
                  generator=torch.Generator()))
    b = list(make(plain, batch_size=8, drop_last=True, valid_label_columns=["label"], seed=3,
                  generator=torch.Generator()))
    assert a == b and len(a) > 10


def _student_and_guide(tiny_model):
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    student = SentenceTransformer(str(tiny_model), device="cpu", model_kwargs={"attn_implementation": "sdpa"})
    guide = SentenceTransformer(str(tiny_model), device="cpu", model_kwargs={"attn_implementation": "sdpa"})
    with torch.no_grad():  # a guide that ranks differently from the student
        gen = torch.Generator().manual_seed(1)
        for p in guide.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return student, guide


def _step(model, loss, rows, labels=None):
    model.zero_grad(set_to_none=True)
    features = [model.preprocess([row[c] for row in rows]) for c in range(len(rows[0]))]
    value = loss(features, labels)
    value.backward()
    return value.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("strategy,margin", [("absolute", 0.0), ("absolute", 0.01), ("relative", 0.05)])
def test_masking_by_guide_equals_sentence_transformers_cached_gist(tiny_model, strategy, margin):
    """One process: the guide rule of loss.false_negatives is CachedGISTEmbedLoss's where the two coincide
    (query-candidate scores only: contrast_anchors/contrast_positives off; temperature = 1 / scale)."""
    from sentence_transformers.sentence_transformer.losses import CachedGISTEmbedLoss

    from loss_harness import make_rows, max_rel_diff

    student, guide = _student_and_guide(tiny_model)
    rows = make_rows(6, 1, seed=5)
    ours = GlobalBatchCachedMNRL(student, mini_batch_size=2, guide=guide, guide_margin=margin,
                                 guide_margin_strategy=strategy)
    theirs = CachedGISTEmbedLoss(student, guide, temperature=1 / 20, mini_batch_size=2, margin=margin,
                                 margin_strategy=strategy, contrast_anchors=False, contrast_positives=False)
    a_loss, a_grads = _step(student, ours, rows)
    assert ours.take_masked_stats()[0] > 0  # the guide did mask candidates here
    b_loss, b_grads = _step(student, theirs, rows)
    assert a_loss == pytest.approx(b_loss, rel=1e-5)
    assert max_rel_diff(a_grads, b_grads) <= 1e-5  # per tensor, norm-relative (as the multi-rank tests)
    plain_loss, _ = _step(student, GlobalBatchCachedMNRL(student, mini_batch_size=2), rows)
    assert abs(plain_loss - a_loss) > 1e-3


@pytest.mark.parametrize("kind", ["kl", "margin_mse"])
def test_distillation_equals_sentence_transformers_losses(tiny_model, kind):
    """The distillation term on the same embeddings and teacher scores: DistillKLDivLoss / MarginMSELoss
    with cosine scores (value and gradients into the embeddings)."""
    from sentence_transformers.sentence_transformer.losses import DistillKLDivLoss, MarginMSELoss
    from sentence_transformers.util import pairwise_cos_sim

    from dist_vdr.config import DistillationConfig

    student, _ = _student_and_guide(tiny_model)
    cfg = DistillationConfig(scores_column="t", kind=kind, weight=1.0, temperature=0.5 if kind == "kl" else 1.0)
    ours = GlobalBatchCachedMNRL(student, distillation=cfg)
    theirs = (DistillKLDivLoss(student, similarity_fct=pairwise_cos_sim, temperature=0.5) if kind == "kl"
              else MarginMSELoss(student, similarity_fct=pairwise_cos_sim))
    reps = _reps(5, 4, 16, seed=3)
    teacher = torch.rand(5, 3, generator=torch.Generator().manual_seed(7))
    a = ours._distillation(reps, teacher, with_backward=True)
    a_grads = [c[0].grad.clone() for c in reps]
    b = theirs.compute_loss_from_embeddings([c[0] for c in reps], teacher)
    b_grads = torch.autograd.grad(b, [c[0] for c in reps])
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    assert all(torch.allclose(x, y, atol=1e-7, rtol=1e-5) for x, y in zip(a_grads, b_grads, strict=True))
    with pytest.raises(ValueError, match="no teacher scores of shape"):
        ours._distillation(reps, teacher[:, :2], with_backward=False)


def test_the_trainer_logs_masked_per_query_and_warns_once_when_most_negatives_are_masked(monkeypatch):
    """The logged count comes from the loss at each logging step; masking that leaves out most of the
    negatives (an untrained guide: measured 61 of 63 per query on the demo, no learning) is warned about
    once, on rank 0."""
    from types import SimpleNamespace

    from dist_vdr.engines import trainers as st_trainers

    stats = iter([(1.5, 0.05), (60.0, 0.95), (61.0, 0.97), None])
    warnings = []
    monkeypatch.setattr(st_trainers.logger, "warning", warnings.append)

    class Stock:
        def log(self, logs, *args, **kwargs):
            self.logged.append(dict(logs))

    class Trainer(st_trainers._DistVdrTrainerMixin, Stock):
        def __init__(self):  # no stock trainer: the log hook alone
            self.logged, self.args = [], SimpleNamespace(process_index=0)
            self.loss = SimpleNamespace(take_masked_stats=lambda: next(stats))

    trainer = Trainer()
    for _ in range(4):
        trainer.log({"loss": 1.0})
    trainer.log({"eval_ndcg": 0.5})  # not a training log: nothing taken
    assert [r.get("masked_per_query") for r in trainer.logged] == [1.5, 60.0, 61.0, None, None]
    assert len(warnings) == 1 and "masks 95% of each query's negatives" in warnings[0]
