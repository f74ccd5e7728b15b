"""A recipe (:class:`Config`): the shared sections, each registered kind's own section, and what the kind
declares, checked the same way for every kind."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from dist_vdr import kinds
from dist_vdr.config.model_data import DataConfig, ModelConfig
from dist_vdr.config.training import EvaluationConfig, LaunchConfig, LossConfig, MiningConfig, TrainingConfig


@dataclass(kw_only=True)
class Config:
    task: str = "embedding"
    """embedding: a SentenceTransformer (bi-encoder); reranker: a multimodal CrossEncoder (the names
    of dist_vdr.kinds.REGISTRY)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    # Each registered kind's own section (reranker: ...) is added by recipe_schema().
    kind_sections: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_kind_options(self, self.task)
        # The task resolves its "auto" values and refuses what its kind cannot train (dist_vdr.kinds).
        kinds.get(self.task).configure(self)
        if self.training.keep_best and not self.evaluation.enabled:
            raise ValueError("training.keep_best picks the checkpoint with the best evaluation during training: "
                             "it needs evaluation.enabled=true")
        if any(d.has_eval for d in self.data.datasets) and self.evaluation.implementation == "stock":
            raise ValueError("data.datasets with eval sets of their own need evaluation.implementation=sharded "
                             "(the stock evaluator evaluates one set, on rank 0)")

    def resolve_batch(self, world_size: int) -> int:
        """Per-device batch for this world size; ValueError when the global batch does not split."""
        t = self.training
        ranks_x_accum = world_size * t.gradient_accumulation_steps
        if t.global_batch_size % ranks_x_accum:
            raise ValueError(
                f"training.global_batch_size={t.global_batch_size} is not divisible by world size {world_size} x "
                f"gradient_accumulation_steps {t.gradient_accumulation_steps} = {ranks_x_accum}; pick a multiple "
                f"of {ranks_x_accum} (e.g. {ranks_x_accum * max(1, round(t.global_batch_size / ranks_x_accum))})"
            )
        per_device = t.global_batch_size // ranks_x_accum
        if t.per_device_batch_size is not None and t.per_device_batch_size != per_device:
            raise ValueError(
                f"training.per_device_batch_size={t.per_device_batch_size} disagrees with global_batch_size="
                f"{t.global_batch_size} on {world_size} rank(s) x {t.gradient_accumulation_steps} accumulation "
                f"(= {per_device} per device); set one of them, or null per_device_batch_size"
            )
        return per_device

    def eval_dims(self, embedding_dim: int) -> list[int]:
        return list(self.evaluation.dims or self.loss.matryoshka_dims or [embedding_dim])


def check_kind_options(cfg: Any, task: str) -> None:
    """What the kind declares (:class:`dist_vdr.kinds.Kind`), checked the same way for every kind: ``loss.name``
    is one of its losses (``auto``: its first), and no shared option that only other kinds take is set."""
    import dataclasses

    kind = kinds.declaration(task)
    loss = getattr(cfg, "loss", None)
    if loss is not None and kind.losses:
        if loss.name == "auto":
            loss.name = kind.losses[0]
        elif loss.name not in kind.losses:
            raise ValueError(f"loss.name={loss.name!r} is not a loss of task={task}; use one of {list(kind.losses)}")
    for key, takers in kinds.optional_options().items():
        if task in takers:
            continue
        *path, name = key.split(".")
        node = cfg
        for part in path:
            node = getattr(node, part, None)
        if node is None or not hasattr(node, name):
            continue
        default = next(f for f in dataclasses.fields(node) if f.name == name)
        default = default.default_factory() if default.default_factory is not dataclasses.MISSING else default.default
        if getattr(node, name) != default:
            raise ValueError(f"{key} applies to task={' or '.join(takers)}; remove it for task={task}")


def recipe_schema(base: type | None = None) -> type:
    """``base`` (default :class:`Config`) with the config section of every registered kind added (``reranker:``
    ...), when ``base`` asks for them (``kind_sections``): a kind declares its section, no shared class names it."""
    import dataclasses

    base = getattr(base, "_composed_from", None) or base or Config
    if not getattr(base, "kind_sections", False):
        return base
    key = (base, kinds.version())
    if key not in _COMPOSED:
        own = {f.name for f in dataclasses.fields(base)}
        extra, owner = [], {}
        for name in kinds.names():
            section = kinds.section_class(name)
            if section is None:
                continue
            if section[0] in own or section[0] in owner:
                raise ValueError(f"task={name} declares the config section {section[0]!r}, which "
                                 f"{'the recipe' if section[0] in own else 'task=' + owner[section[0]]} has already")
            owner[section[0]] = name
            extra.append((section[0], section[1], field(default_factory=section[1])))
        composed = dataclasses.make_dataclass(base.__name__, extra, bases=(base,), kw_only=True)
        composed.__module__, composed.__qualname__, composed.__doc__ = base.__module__, base.__qualname__, base.__doc__
        composed.__reduce__ = _reduce_composed
        composed._composed_from = base
        _COMPOSED[key] = composed
    return _COMPOSED[key]


_COMPOSED: dict[tuple[type, int], type] = {}


def _reduce_composed(self):
    # A composed class is built at run time: pickle it as (its base, its fields), composed again when loaded.
    return _rebuild_composed, (type(self)._composed_from, dict(self.__dict__))


def _rebuild_composed(base: type, state: dict):
    obj = object.__new__(recipe_schema(base))
    obj.__dict__.update(state)
    return obj


