"""task: multi_vector at load time: its section and options are composed and checked like every kind's, and its
loss is built from the recipe (masking, distillation, a mixture's per-dataset options). Training it:
tests/integration/test_multi_vector_train.py; the loss's exactness: tests/integration/test_score_exchange_loss.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_vdr import kinds
from dist_vdr.config import load_config
from dist_vdr.distributed import DistInfo
from dist_vdr.kinds.base import RunContext

BASE = ["task=multi_vector", "model.name_or_path=./artifacts/tiny-multi-vector"]


def _cfg(*overrides: str):
    return load_config(None, [*BASE, *overrides], check_paths=False)


def test_the_kind_is_registered_with_its_section_and_options():
    assert "multi_vector" in kinds.names()
    cfg = _cfg("multi_vector.token_dim=64", "multi_vector.divide_by_query_length=true")
    assert cfg.loss.name == "maxsim_infonce" and cfg.multi_vector.token_dim == 64
    assert cfg.training.batch_sampler == "no_duplicates_hashed"
    assert kinds.get("multi_vector").scoring(cfg).divide_by_query_length is True
    for overrides, message in (
            (["loss.name=cmnrl"], "loss.name='cmnrl' is not a loss of task=multi_vector"),
            (["loss.pos_weight=2.0"], "loss.pos_weight applies to task=reranker; remove it for task=multi_vector"),
            (["multi_vector.token_dim=0"], "multi_vector.token_dim must be >= 1"),
            (["multi_vector.query_length=0"], "multi_vector.query_length must be >= 1"),
            (["multi_vector.single_vector_dims=[64]"], "single_vector_dims applies to multi_vector.hybrid=true"),
            (["multi_vector.hybrid=true", "multi_vector.single_vector_scale=0"], "single_vector_scale > 0"),
            (["evaluation.implementation=stock"], "use evaluation.implementation=sharded"),
            (["loss.implementation=stock"], "loss.implementation=stock is not available for task=multi_vector"),
            (["loss.distillation.scores_column=t", "data.negative_columns=[]"], "set data.negative_columns")):
        with pytest.raises(ValueError, match=message):
            _cfg(*overrides)
    # Another kind's section in a recipe stays allowed: the commands run with the recipe read it (an embedding
    # recipe's reranker: section names the teacher of score-rows).
    assert load_config(None, ["multi_vector.token_dim=8"], check_paths=False).multi_vector.token_dim == 8


def test_the_recipe_builds_the_score_exchange_loss(tmp_path):
    cfg = _cfg("loss.false_negatives.id_column=document_id", "data.negative_columns=[negative_0]",
               "loss.distillation.scores_column=teacher_scores", "multi_vector.query_length=48",
               "loss.matryoshka_dims=[32,16]", "data.datasets=[{name: a, path: /a}, {name: b, path: /b, "
               "in_batch_negatives: false}]", "data.mixture=weighted")
    task = kinds.get("multi_vector")
    ctx = RunContext(cfg=cfg, info=DistInfo(rank=1, world_size=2), out=Path(tmp_path), engine=None)
    loss = task.build_loss(ctx, torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert type(loss).__name__ == "ScoreExchangeCachedLoss"
    assert (loss.rank, loss.world_size, loss.query_length) == (1, 2, 48)
    assert loss.mask_same_ids and loss.distillation is not None
    assert [d for d, _ in loss.dims_weights] == [32, 16]
    assert [d.in_batch_negatives for d in loss.datasets] == [True, False]
    ctx = RunContext(cfg=_cfg("loss.cross_device_negatives=false"), info=DistInfo(rank=1, world_size=2),
                     out=Path(tmp_path), engine=None)
    local = task.build_loss(ctx, torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert (local.rank, local.world_size) == (0, 1)  # negatives kept on their rank: a world of one


def test_the_hybrid_recipe_builds_the_hybrid_loss(tmp_path):
    cfg = _cfg("multi_vector.hybrid=true", "multi_vector.single_vector_dims=[64,32]",
               "multi_vector.single_vector_weight=0.5", "multi_vector.single_vector_scale=30")
    ctx = RunContext(cfg=cfg, info=DistInfo(rank=0, world_size=2), out=Path(tmp_path), engine=None)
    loss = kinds.get("multi_vector").build_loss(ctx, torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert type(loss).__name__ == "HybridCachedLoss"
    assert [(d, w) for d, w in loss.single.dims_weights] == [(64, 0.5), (32, 0.5)]
    assert (loss.single.scale, loss.single.world_size) == (30.0, 2)


def test_what_a_new_user_tried_is_refused_in_one_line(tiny_model, tiny_multi_vector, tmp_path):
    """The campaign's findings: dims and scales that are no numbers of the kind, a multi-vector model where a
    single-vector one is read (a reranker's retriever, a guide, a command's model of another kind)."""
    from dist_vdr.config import ModelConfig

    for overrides, message in ((["evaluation.dims=[0,-8]"], "evaluation.dims must be positive"),
                               (["loss.scale=0"], "loss.scale must be > 0"),
                               (["multi_vector.hybrid=true", "multi_vector.single_vector_dims=[32,32]"],
                                "single_vector_dims has duplicates"),
                               ([f"loss.false_negatives.guide={tiny_model}"], "is no multi-vector model")):
        with pytest.raises(ValueError, match=message):
            _cfg(*overrides)
    with pytest.raises(ValueError, match="is a model of task=multi_vector: the reranker's retrieval"):
        load_config(None, ["task=reranker", f"reranker.retriever={tiny_multi_vector}"], check_paths=False)
    task = kinds.get("multi_vector")
    with pytest.raises(ValueError, match="is no multi-vector model"):
        task.load_model(ModelConfig(name_or_path=str(tiny_model)), _cfg(), device="cpu", precision="fp32")
    # A folder trained with MeanMaxSim records it; the commands then score so without being told.
    model = task.load_model(ModelConfig(name_or_path=str(tiny_multi_vector)), _cfg(), device="cpu", precision="fp32")
    model.similarity_fn_name = "meanmaxsim"
    model.save(str(tmp_path / "mean"))
    cfg = _cfg()
    task.load_model(ModelConfig(name_or_path=str(tmp_path / "mean")), cfg, device="cpu", precision="fp32")
    assert cfg.multi_vector.divide_by_query_length and task.scoring(cfg).divide_by_query_length


def test_memory_and_evaluation_keys_do_not_stop_a_resume():
    from dist_vdr.run.resume_guard import REPORTING_KEYS

    for key in ("multi_vector.chunk_elements", "multi_vector.query_length", "multi_vector.pool_factor"):
        assert key.startswith(REPORTING_KEYS), key
