"""One `dist-vdr bench train` setting in its own process: build the model, or train N steps (ours or stock).

    python -m dist_vdr.bench.train_speed_worker '<job JSON>'   (written by dist_vdr.bench.train_speed)
"""

from __future__ import annotations

import json
import sys

from dist_vdr.run.folder import RunDir


def _device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def build(job: dict) -> None:
    from dist_vdr.kinds.tiny import TinyModelSpec, build_tiny_model

    device = _device(job["device"])
    if job["build"] == "tiny":
        build_tiny_model(job["model_dir"], TinyModelSpec())
    else:  # bf16 on the device it will run on: 2.13 B parameters initialise in seconds on a GPU
        build_tiny_model(job["model_dir"], TinyModelSpec.qwen3_vl_2b(), device=device,
                         dtype="bfloat16" if device == "cuda" else "float32")


def _common_overrides(job: dict) -> list[str]:
    return [f"model.name_or_path={job['model_dir']}", f"data.path={job['data_dir']}", "data.train_name=null",
            "data.train_split=train", "data.max_train_samples=null", "data.negative_columns=[negative_0]",
            "data.pages_path=null", "evaluation.enabled=false", f"training.max_steps={job['max_steps']}",
            f"training.global_batch_size={job['global_batch_size']}", f"training.output_dir={job['output_dir']}",
            "training.record_step_stats=true", "training.logging_steps=1", "training.save_steps=1000000000",
            "training.save_total_limit=1", "training.gradient_accumulation_steps=1",
            f"launch.device={'cuda' if _device(job['device']) == 'cuda' else 'cpu'}", "launch.handle_preemption=false"]


def train_ours(job: dict) -> None:
    """dist-vdr's training entry point as `dist-vdr train` calls it, on the recipe with the setting's overrides."""
    from dist_vdr import distributed
    from dist_vdr.config import load_config
    from dist_vdr.run.training import run_training

    cfg = load_config(job["recipe"], [*_common_overrides(job), *job["setting"]["overrides"]])
    run_training(cfg)  # launch.handle_preemption=false: no signal handling to install first
    distributed.shutdown()  # leave the process group as the command does (see shutdown's note)


def train_stock(job: dict) -> None:
    """sentence-transformers' own trainer and losses, with the recipe's model, precision and data settings."""
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MatryoshkaLoss,
    )
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers

    from dist_vdr.config import load_config
    from dist_vdr.data.loading import load_train
    from dist_vdr.models.build import model_load_kwargs
    from dist_vdr.run.step_stats import StepStatsCallback

    cfg = load_config(job["recipe"], _common_overrides(job))
    device = _device(job["device"])
    if cfg.launch.num_threads_per_process > 0:  # as dist-vdr train sets it: the same cores for both
        import torch

        torch.set_num_threads(cfg.launch.num_threads_per_process)
    setting = job["setting"]
    model = SentenceTransformer(cfg.model.name_or_path, device=device,
                                model_kwargs=model_load_kwargs(cfg.model, cfg.training.precision, device == "cuda"),
                                processor_kwargs=dict(cfg.model.processor_kwargs) or None)
    kwargs = {"mini_batch_size": setting["mini_batch_size"]}
    if setting["mini_batch_num_tokens"]:
        kwargs["mini_batch_num_tokens"] = setting["mini_batch_num_tokens"]
    inner = CachedMultipleNegativesRankingLoss(model, **kwargs)
    loss = MatryoshkaLoss(model, inner, list(cfg.loss.matryoshka_dims)) if cfg.loss.matryoshka_dims else inner
    t = cfg.training
    args = SentenceTransformerTrainingArguments(
        output_dir=job["output_dir"], per_device_train_batch_size=job["global_batch_size"], max_steps=job["max_steps"],
        learning_rate=t.learning_rate, warmup_steps=t.warmup_ratio, bf16=t.precision == "bf16",
        fp16=t.precision == "fp16", seed=t.seed, logging_steps=1, save_strategy="no", report_to="none",
        batch_sampler=BatchSamplers.NO_DUPLICATES, dataloader_num_workers=t.dataloader_num_workers,
        dataloader_drop_last=True, use_cpu=device == "cpu")
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=load_train(cfg.data), loss=loss,
                                         callbacks=[StepStatsCallback(RunDir(job["output_dir"]).step_stats)])
    trainer.train()


def main(argv: list[str]) -> None:
    job = json.loads(argv[0])
    if "build" in job:
        build(job)
    elif job["setting"]["kind"] == "stock":
        train_stock(job)
    else:
        train_ours(job)


if __name__ == "__main__":
    main(sys.argv[1:])
