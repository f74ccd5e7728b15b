"""Mixtures of datasets (dist_vdr.data.mixture): every optimizer step's global batch from one dataset
on every rank, the order independent of the number of ranks, weights respected, deterministic for resume."""

from __future__ import annotations

import collections

import datasets
import pytest

from dist_vdr.data.mixture import MixtureBatchSampler, schedule

SIZES = [96, 64, 160]


def _mixture():
    # Dataset k's rows are "k:<i>"; queries repeat within a dataset (rows i and i + n/2), so only a
    # global de-duplication keeps copies out of one step's batch.
    rows = [f"{k}:q{i % (n // 2)}" for k, n in enumerate(SIZES) for i in range(n)]
    pages = [f"{k}:p{i}" for k, n in enumerate(SIZES) for i in range(n)]
    return datasets.Dataset.from_dict({"query": rows, "image": pages})


def _sampler(ds, batch_size, world_size, *, strategy="weighted", weights=None, accumulation=1, epoch=0, seed=5):
    s = MixtureBatchSampler(ds, batch_size=batch_size, drop_last=True, seed=seed, sizes=SIZES, weights=weights,
                            strategy=strategy, world_size=world_size, accumulation=accumulation)
    s.set_epoch(epoch)
    return s


def _dataset_of(row: int) -> int:
    return next(k for k in reversed(range(len(SIZES))) if row >= sum(SIZES[:k]))


def _steps(batches, world_size, accumulation=1):
    """Per optimizer step: the global micro-batches (ranks' batches joined) it trained on."""
    per_micro = [sum(batches[i:i + world_size], []) for i in range(0, len(batches), world_size)]
    return [per_micro[i:i + accumulation] for i in range(0, len(per_micro), accumulation)]


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("strategy", ["weighted", "exhaust", "round_robin"])
def test_every_step_holds_one_dataset_on_all_ranks_and_equals_one_process(strategy, world_size):
    ds = _mixture()
    sampler = _sampler(ds, 16 // world_size, world_size, strategy=strategy)
    batches = list(sampler)
    assert len(batches) == len(sampler) and len(batches) % world_size == 0
    one = list(_sampler(ds, 16, 1, strategy=strategy))
    steps = _steps(batches, world_size)
    assert [step[0] for step in steps] == one  # the union over ranks = one process's global batch, in order
    queries = ds["query"]
    for (global_batch,) in steps:
        assert len({_dataset_of(i) for i in global_batch}) == 1  # every rank: the same dataset
        assert len({queries[i] for i in global_batch}) == 16  # no duplicate across the ranks
    used = [_dataset_of(step[0][0]) for step in steps]
    assert used == sampler.last_schedule
    if strategy == "exhaust":  # every dataset's steps once
        assert collections.Counter(used) == {k: n // 16 for k, n in enumerate(SIZES)}
    if strategy == "round_robin":
        assert used == [0, 1, 2] * (min(SIZES) // 16)


def test_weights_give_the_asked_proportions():
    """weighted: over the epochs, dataset k's share of the steps is weight_k / sum; with n steps the
    binomial standard deviation is sqrt(p(1-p)/n): asserted within 3 of them."""
    ds = _mixture()
    weights = [1.0, 3.0, 0.0]
    used = []
    for epoch in range(20):
        sampler = _sampler(ds, 8, 2, weights=weights, epoch=epoch)
        list(sampler)
        used += sampler.last_schedule
    n = len(used)
    share = used.count(1) / n
    assert n == 20 * sum(s // 16 for s, w in zip(SIZES, weights, strict=True) if w)  # weight 0 adds no steps
    assert abs(share - 0.75) < 3 * (0.75 * 0.25 / n) ** 0.5, share
    assert used.count(2) == 0  # weight 0: never drawn


def test_accumulation_keeps_one_dataset_for_the_whole_optimizer_step():
    ds = _mixture()
    steps = _steps(list(_sampler(ds, 4, 2, accumulation=2)), 2, accumulation=2)
    for micro in steps:
        assert len(micro) == 2 and len({_dataset_of(i) for batch in micro for i in batch}) == 1


def test_a_dataset_upsampled_past_its_rows_starts_another_pass():
    """weighted with most weight on the smallest dataset: it is drawn more often than it has batches and
    continues with a fresh shuffle (upsampling), never an empty step."""
    ds = _mixture()
    sampler = _sampler(ds, 8, 2, weights=[1.0, 30.0, 0.0])
    steps = _steps(list(sampler), 2)
    assert len(steps) == (SIZES[0] + SIZES[1]) // 16
    ones = [step for step in steps if _dataset_of(step[0][0]) == 1]
    assert len(ones) > SIZES[1] // 16 and all(len(step[0]) == 16 for step in steps)
    assert len({tuple(step[0]) for step in ones}) == len(ones)  # the second pass is a fresh shuffle


def test_deterministic_per_epoch_so_a_resume_continues_with_the_same_rows():
    """The trainer resumes by skipping the batches already consumed of the epoch's iteration: the
    iteration must be the same every time (and differ between epochs)."""
    ds = _mixture()
    a, b = list(_sampler(ds, 8, 2)), list(_sampler(ds, 8, 2))
    assert a == b
    assert list(_sampler(ds, 8, 2, epoch=1)) != a
    # 2 ranks -> 1 rank: the global batches (and so the order of everything) are unchanged
    assert [x + y for x, y in zip(a[::2], a[1::2], strict=True)] == list(_sampler(ds, 16, 1))


def test_user_errors_say_the_fix():
    ds = _mixture()
    with pytest.raises(ValueError, match="fewer rows than one optimizer step"):
        _sampler(ds, 64, 2)
    with pytest.raises(ValueError, match="positive sum"):
        _sampler(ds, 8, 2, weights=[0, 0, 0])
    same = datasets.Dataset.from_dict({"query": ["q"] * sum(SIZES), "image": ["p"] * sum(SIZES)})
    with pytest.raises(ValueError, match="no full batch of 16 rows without repeated values"):
        list(_sampler(same, 8, 2))
    with pytest.raises(ValueError, match="use one of"):
        schedule([1, 2], [1, 1], "proportionate", 0)
    with pytest.raises(ValueError, match="positive sum"):
        schedule([1, 2], [0, 0], "weighted", 0)


# -- the recipe key, the loading, the collator, the loss's per-dataset bookkeeping ---------------------------

def _cfg(*overrides):
    from dist_vdr.config import load_config

    return load_config(None, list(overrides), check_paths=False)


def test_recipe_entries_inherit_data_keys_and_refuse_mistakes():
    from dist_vdr.data.mixture_rows import entry_config

    cfg = _cfg("data.query_column=q", "data.datasets=[{name: a, path: x, max_rows: 5}, "
               "{name: b, positive_column: page, eval_path: e}]")
    a, b = (entry_config(cfg.data, e) for e in cfg.data.datasets)
    assert (a.path, a.query_column, a.max_train_samples, a.datasets) == ("x", "q", 5, [])
    assert (b.path, b.positive_column, b.eval_path) == (cfg.data.path, "page", "e")
    for overrides, words in (
            (["data.datasets=[{name: a}, {name: a}]"], "repeat"),
            (["data.datasets=[{name: a, negative_columns: [x, y]}]"], "as many negatives"),
            (["data.datasets=[{name: a, weight: 0}]"], "every weight is 0"),
            (["data.datasets=[{name: 'a b'}]"], "letters, digits"),
            (["data.datasets=[{path: x}]"], "name is not set"),
            (["data.datasets=[{name: a, wieght: 1}]"], "unknown key 'wieght' of a data.datasets entry"),
            (["data.datasets.0.path=x"], "cannot be set by its index"),
            (["data.mixture=random"], "data.mixture"),
            (["task=reranker", "data.datasets=[{name: a}]"],
             "data.datasets applies to task=embedding or multi_vector; remove it for task=reranker"),
            (["data.datasets=[{name: a, cross_device_negatives: false}]", "loss.implementation=stock"],
             "need loss.name=cmnrl"),
            (["data.datasets=[{name: a, weight: 2}]", "data.mixture=mixed"], "cannot have a weight"),
            (["data.datasets=[{name: a, eval_path: e}]", "evaluation.implementation=stock"], "implementation=sharded"),
            (["data.negative_columns=[]", "data.datasets=[{name: a, in_batch_negatives: false}]"],
             "the loss would be 0"),
            (["data.datasets=[{name: a, weight: 2}]", "data.mixture=exhaust"], "does not use"),
            (["data.datasets=[{name: a, negative_columns: [n1]}]", "loss.false_negatives.id_column=document_id"],
             "wrong pages"),
            (["data.datasets=[{name: a}]", "training.batch_sampler=batch_sampler"], "no_duplicates_hashed")):
        with pytest.raises(ValueError, match=words):
            _cfg(*overrides)


def _pages(n: int, shade: int) -> list:
    from PIL import Image

    return [Image.new("RGB", (4, 4), (shade, i, 0)) for i in range(n)]


def _two_datasets(tmp_path):
    image = datasets.Image()
    one = datasets.Dataset.from_dict({"query": ["a", "b", "c"], "image": _pages(3, 0), "neg": _pages(3, 1)},
                                     features=datasets.Features({"query": datasets.Value("string"), "image": image,
                                                                 "neg": image}))
    two = datasets.Dataset.from_dict({"text": ["d", "e"], "page": _pages(2, 2), "other": _pages(2, 3)},
                                     features=datasets.Features({"text": datasets.Value("string"), "page": image,
                                                                 "other": image}))
    one.save_to_disk(str(tmp_path / "one"))
    two.save_to_disk(str(tmp_path / "two"))
    return _cfg("data.negative_columns=[neg]", "data.validate_images=false",
                f"data.datasets=[{{name: one, path: {tmp_path / 'one'}}}, {{name: two, path: {tmp_path / 'two'}, "
                f"query_column: text, positive_column: page, negative_columns: [other], weight: 3}}]")


def test_datasets_load_into_one_table_under_data_column_names(tmp_path):
    from dist_vdr.data.mixture_rows import DATASET_COLUMN, ROW_COLUMN, load_mixture, weights

    cfg = _two_datasets(tmp_path)
    rows = load_mixture(cfg.data)
    assert (rows.names, rows.sizes, rows.offsets) == (["one", "two"], [3, 2], [0, 3])
    assert rows.train.column_names == ["query", "image", "neg", DATASET_COLUMN, ROW_COLUMN]
    assert rows.train["query"] == ["a", "b", "c", "d", "e"]
    assert [im.getpixel((0, 0))[0] for im in rows.train["neg"]] == [1, 1, 1, 3, 3]  # two's "other" under "neg"
    assert rows.train[DATASET_COLUMN] == [0, 0, 0, 1, 1] and rows.train[ROW_COLUMN] == [0, 1, 2, 0, 1]
    assert weights(cfg.data, rows.sizes) == [3.0, 3.0]  # null: the rows; given: as given


def test_datasets_with_different_kinds_of_page_column_are_refused(tmp_path):
    import numpy as np

    from dist_vdr.data.mixture_rows import load_mixture

    cfg = _two_datasets(tmp_path)
    ints = datasets.Dataset.from_dict({"text": ["d"], "page": [np.int64(4)], "other": _pages(1, 3)})
    ints.save_to_disk(str(tmp_path / "ints"))
    cfg.data.datasets[1].path = str(tmp_path / "ints")
    with pytest.raises(ValueError, match="column 'image' of 'two' holds Value\\(int64\\), of 'one' Image"):
        load_mixture(cfg.data)


def test_the_collator_hands_the_dataset_to_the_loss_and_keeps_it_out_of_the_inputs(monkeypatch, tmp_path):
    import torch

    from dist_vdr.data import page_refs
    from dist_vdr.data.mixture_rows import DATASET_COLUMN, ROW_COLUMN, DatasetLabelCollator

    seen = []

    class Inner:
        valid_label_columns = ["label"]

        def __call__(self, rows):
            seen.extend(rows)
            return {"label": {"ids": torch.ones(len(rows))}}

    monkeypatch.setenv(page_refs.TRACE_ENV, str(tmp_path))
    collator = DatasetLabelCollator(Inner())
    batch = collator([{"query": "a", DATASET_COLUMN: 1, ROW_COLUMN: 7},
                      {"query": "b", DATASET_COLUMN: 1, ROW_COLUMN: 2}])
    assert seen == [{"query": "a"}, {"query": "b"}]
    assert batch["label"]["dataset"].tolist() == [1, 1] and batch["label"]["ids"].tolist() == [1, 1]
    assert batch[page_refs.TRACE_KEY] == ["1:7", "1:2"]
    assert collator.valid_label_columns == ["label", DATASET_COLUMN, ROW_COLUMN]


def test_the_loss_takes_each_steps_options_and_sums_its_losses_per_dataset(tiny_model):
    import torch
    from sentence_transformers import SentenceTransformer

    from dist_vdr.losses.global_batch import DatasetOptions, GlobalBatchCachedMNRL

    model = SentenceTransformer(str(tiny_model), device="cpu")
    loss = GlobalBatchCachedMNRL(model, mini_batch_size=1, datasets=[
        DatasetOptions(index=0), DatasetOptions(index=1, mini_batch_size=3, in_batch_negatives=False)])
    texts = [["a page", "b page", "c page"], ["red", "blue", "green"], ["one", "two", "three"]]  # + a negative
    for k in (0, 1, 1):
        feats = [model.preprocess(column) for column in texts]
        loss(feats, {"dataset": torch.full((3,), k)}).backward()
        assert loss.mini_batch_size == (1 if k == 0 else 3)
    sums = loss.take_dataset_losses()
    # in_batch_negatives off: each query's softmax holds its positive and its one negative (log 2 at random)
    assert sums[:, 1].tolist() == [1.0, 2.0] and 0 < float(sums[1, 0]) / 2 < float(sums[0, 0])
    assert loss.take_dataset_losses()[:, 1].tolist() == [0.0, 0.0]  # taken: reset
    with pytest.raises(RuntimeError, match="several datasets"):
        loss([model.preprocess(column) for column in texts], {"dataset": torch.tensor([0, 1, 1])})


def test_forms_style_pages_have_their_own_vocabulary(tmp_path):
    from dist_vdr.data.synthetic import SyntheticPagesSpec, generate_pages

    out = generate_pages(tmp_path / "forms", SyntheticPagesSpec(num_train=8, num_eval_queries=4, style="forms"),
                         show_progress=False)
    queries = datasets.load_from_disk(str(out))["train"]["query"]
    assert all("form" in q or "band" in q for q in queries) and not any("chart" in q for q in queries)
    with pytest.raises(ValueError, match="style"):
        SyntheticPagesSpec(style="slides")


def test_several_eval_sets_give_each_sets_metrics_and_their_macro_average(tmp_path):
    from dist_vdr.retrieval import stock
    from dist_vdr.retrieval.multi import MultiSetEvaluator

    class Fake:
        all_ranks = True
        primary_metric = "dim8_cosine_ndcg@10"
        summarise = staticmethod(stock.summarise)

        def __init__(self, value):
            self.value, self.paths = value, []

        def __call__(self, model, output_path=None, epoch=-1, steps=-1):
            self.paths.append(output_path)
            return {"dim8_cosine_ndcg@10": self.value, "dim4_cosine_ndcg@10": self.value / 2}

    a, b = Fake(0.5), Fake(0.9)
    multi = MultiSetEvaluator({"charts": a, "forms": b})
    raw = multi(None, output_path=str(tmp_path), steps=3)
    assert raw["dim8_cosine_ndcg@10"] == pytest.approx(0.7) and raw["forms/dim4_cosine_ndcg@10"] == 0.45
    assert a.paths == [str(tmp_path / "charts")] and b.paths == [str(tmp_path / "forms")]
    rows = multi.summarise(raw)
    assert rows["8"]["ndcg@10"] == pytest.approx(0.7) and rows["4"]["ndcg@10"] == pytest.approx(0.35)
    assert rows["charts/8"]["ndcg@10"] == 0.5 and rows["forms/4"]["ndcg@10"] == 0.45
    assert multi.primary_metric == "dim8_cosine_ndcg@10"

    class RankZero(Fake):
        all_ranks = False

    with pytest.raises(ValueError, match="implementation=sharded"):
        MultiSetEvaluator({"charts": a, "forms": RankZero(0.1)})


def test_the_plan_says_each_datasets_steps_and_epochs_per_epoch():
    from dist_vdr.data.mixture import plan_summary

    weighted = plan_summary(["a", "b"], [320, 80], [1.0, 1.0], "weighted", 16)  # 20 + 5 steps, drawn 1:1
    assert [(p["steps_per_epoch"], p["epochs_per_epoch"]) for p in weighted] == [(12.5, 0.625), (12.5, 2.5)]
    exhaust = plan_summary(["a", "b"], [320, 80], [320.0, 80.0], "exhaust", 16)
    assert [p["epochs_per_epoch"] for p in exhaust] == [1.0, 1.0]
    robin = plan_summary(["a", "b"], [320, 80], [1.0, 1.0], "round_robin", 16)
    assert [p["steps_per_epoch"] for p in robin] == [5.0, 5.0]


def test_the_sampler_of_a_mixture_keeps_steps_within_a_dataset_unless_mixed():
    from dist_vdr.data.mixture import MixtureBatchSampler
    from dist_vdr.data.mixture_rows import MixtureRows
    from dist_vdr.data.sampler import GlobalNoDuplicatesBatchSampler
    from dist_vdr.run.setup import batch_sampler

    rows = MixtureRows(train=None, names=["a", "b"], sizes=[96, 64], configs=[], parts=[])
    weighted = batch_sampler(_cfg("data.datasets=[{name: a}, {name: b}]"), 2, None, rows)
    mixed = batch_sampler(_cfg("data.datasets=[{name: a}, {name: b}]", "data.mixture=mixed"), 2, None, rows)
    assert weighted.func is MixtureBatchSampler and weighted.keywords["sizes"] == [96, 64]
    assert mixed.func is GlobalNoDuplicatesBatchSampler
    with pytest.raises(ValueError, match="no_duplicates"):
        batch_sampler(_cfg("data.datasets=[{name: a}, {name: b}]", "training.batch_sampler=batch_sampler"), 2, None,
                      rows)


def test_a_datasets_max_pixels_downscales_its_pages_only():
    from PIL import Image

    from dist_vdr.data.mixture_rows import DATASET_COLUMN, ROW_COLUMN, DatasetLabelCollator

    seen = []
    collator = DatasetLabelCollator(lambda rows: seen.extend(rows) or {}, [None, 100], ["image"])
    big = Image.new("RGB", (40, 10))
    collator([{"query": "a", "image": big, DATASET_COLUMN: 0, ROW_COLUMN: 0},
              {"query": "b", "image": big, DATASET_COLUMN: 1, ROW_COLUMN: 0}])
    assert seen[0]["image"].size == (40, 10) and seen[1]["image"].size == (20, 5)  # 100 px, aspect 4:1


def test_review_mends(tmp_path, tiny_model):
    """Found by a hostile review: each once a crash, a late failure or a silent mistake."""
    # loss.cross_device_negatives=false with a mixture: every rank builds its loss (was: rank 1 outside world 1),
    # and a dataset asking for cross-device negatives gets them
    from sentence_transformers import SentenceTransformer

    from dist_vdr.cli.settings import EvalCommand
    from dist_vdr.config import load_config
    from dist_vdr.kinds.embedding.loss import build_loss
    from dist_vdr.losses.global_batch import dataset_options
    from dist_vdr.run.data import prepare_data

    cfg = _cfg("loss.cross_device_negatives=false",
               "data.datasets=[{name: a}, {name: b, cross_device_negatives: true}]")
    model = SentenceTransformer(str(tiny_model), device="cpu")
    loss = build_loss(model, cfg.loss, rank=1, world_size=2, datasets=dataset_options(cfg))
    assert (loss.rank, loss.world_size) == (1, 2)
    assert [o.cross_device_negatives for o in loss.datasets] == [False, True]
    # a dataset smaller than one step, named, before any model is loaded
    two = _two_datasets(tmp_path)
    two.data.datasets[1].max_rows = 1
    two.training.global_batch_size = 2
    with pytest.raises(ValueError, match=r"data.datasets\[two\]: 1 rows, fewer than one optimizer step"):
        prepare_data(two, None, None, hash_rows=False)
    # a weight-0 dataset is never drawn: it may be small
    two.data.datasets[1].weight = 0.0
    two.evaluation.enabled = False
    assert prepare_data(two, _OneRank(), None, hash_rows=False).mixture.sizes == [3, 1]
    # data.path is not needed when every dataset has its own path and eval set
    paths = [f"data.datasets=[{{name: one, path: {tmp_path / 'one'}, eval_path: {tmp_path / 'one'}}}]",
             "data.path=./no-such-folder", f"model.name_or_path={tiny_model}"]
    assert load_config(None, paths).data.datasets[0].path == str(tmp_path / "one")
    # an entry's load error names the entry; the commands refuse a mixture
    with pytest.raises(ValueError, match=r"data.datasets\[one\]: training data .* has no column"):
        prepare_data(_cfg(f"data.datasets=[{{name: one, path: {tmp_path / 'one'}, query_column: nope}}]",
                          "data.validate_images=false"), None, None, hash_rows=False)
    with pytest.raises(ValueError, match="runs over one dataset"):
        load_config(None, ["data.path=x", "model.name_or_path=m", "data.datasets=[{name: a}]"], check_paths=False,
                    schema=EvalCommand)


class _OneRank:
    rank, world_size, is_main, device = 0, 1, True, "cpu"

