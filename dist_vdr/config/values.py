"""The value sets and checks every config section shares (a choice, a step cadence, the required marker)."""

from __future__ import annotations

from typing import Any

_PRECISIONS = ("fp32", "bf16", "fp16")
_SAMPLERS = ("no_duplicates_hashed", "no_duplicates", "batch_sampler")
DEVICES = ("auto", "cpu", "cuda")
"""launch.device (and the --device option of the commands)."""
DTYPES = ("auto", "float32", "bfloat16", "float16")
"""model.dtype (and the --dtype option of the commands)."""
_EVAL_FORMATS = ("ir", "triplets", "beir")
# training.report_to name -> the packages that provide it (any one of them)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboardX"), "trackio": ("trackio",), "wandb": ("wandb",),
            "mlflow": ("mlflow",)}
REQUIRED = "???"
"""The default of a key a command cannot run without (OmegaConf's MISSING): loading fails, naming
the key and its option, unless the config file, an option or an override sets it."""
_METRICS = ("ndcg", "mrr", "map", "recall", "precision", "accuracy")  # evaluation.metrics.METRICS


def _check_steps(key: str, value: float | None) -> None:
    """A step cadence: a positive whole number of steps, or a fraction (< 1) of the total steps."""
    if value is None and key == "eval_steps":
        return
    if value is None or value <= 0 or (value >= 1 and value != int(value)):
        raise ValueError(f"training.{key} must be a whole number of steps >= 1 or a fraction in (0, 1) of the "
                         f"total steps, got {value}")


def check_choice(section: str, key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        name = f"{section}.{key}" if section else key
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}")


