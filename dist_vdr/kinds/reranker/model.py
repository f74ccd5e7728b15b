"""Build the multimodal CrossEncoder a recipe describes, with one of two heads.

- ``logit_score``: ``Transformer(any-to-any)`` (the vision-language model with its LM head) +
  ``LogitScore``: score = logit("1") - logit("0") at the last position, the layout of the published
  multimodal rerankers.
- ``dense``: ``Transformer(feature-extraction)`` (no LM head) + last-token pooling + a 1-output
  ``Dense``, initialised from the LM head's rows as ``W["1"] - W["0"]``: at initialisation it scores
  exactly as ``logit_score`` (the last hidden state is already final-normed) without computing
  the logits of the whole vocabulary.
- ``auto``: a folder or hub id that is already a CrossEncoder keeps its own modules; otherwise
  ``logit_score``.

Pairs are (query text, page image); sentence-transformers maps them to ``query``/``document``
chat messages, which the chat template must render. ``RERANK_CHAT_TEMPLATE`` does, for Qwen-VL
tokens; the recipe's ``reranker.chat_template`` can install it (``builtin``) or a file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from dist_vdr import log
from dist_vdr.config import ModelConfig
from dist_vdr.kinds.reranker.config import RerankerConfig

if TYPE_CHECKING:
    import torch

logger = log.get(__name__)

# Beside a residual reranker (trained with ``reranker.retrieval_score_weight`` > 0): its scores are
# corrections to one retriever's cosine scores, meaningful only added to them with that weight.
FUSION_FILE = "dist_vdr_fusion.json"


def fusion_record(cfg: RerankerConfig) -> dict | None:
    """What ``FUSION_FILE`` holds for a reranker trained with ``cfg``; None for a plain reranker."""
    if not cfg.retrieval_score_weight:
        return None
    return {"retriever": str(cfg.retriever), "retrieval_score_weight": cfg.retrieval_score_weight}


def saved_fusion(name_or_path: str) -> dict | None:
    """The fusion record saved with a local reranker folder, if any."""
    path = Path(name_or_path) / FUSION_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def fusion_weight(reranker_path: str, given_weight: float | None, retriever: str) -> tuple[float, list[str]]:
    """The weight of the retrieval score in the ranking of ``reranker_path`` over ``retriever``'s
    candidates, and the notes to show about it: ``given_weight`` when set, else the weight a residual
    reranker was trained with (its ``FUSION_FILE``; 0 for a plain reranker)."""
    notes = []
    weight = given_weight
    if weight is None:  # a residual reranker ranks by its score + its training weight x retrieval score
        fusion = saved_fusion(reranker_path) or {}
        weight = fusion.get("retrieval_score_weight", 0.0)
        if weight:
            notes.append(f"ranking by reranker score + {weight:g} x retrieval score (the reranker's {FUSION_FILE}; "
                         f"--retrieval-score-weight overrides)")
            if fusion.get("retriever") not in (retriever, None):
                notes.append(f"note: this reranker was trained on the scores of {fusion['retriever']}, "
                             f"not of {retriever}")
    if weight < 0:
        raise ValueError("--retrieval-score-weight must be >= 0")
    return weight, notes

# Renders the instruction (a system message, e.g. from ``reranker.prompt``; a default otherwise), then
# the document, then the query, then opens the assistant turn: the next token is the answer "1" or
# "0" that LogitScore reads. Document first: in a causal model the page's tokens are then computed
# without the query, as an embedding model computes them (measured on the tiny reranker warm-started
# from the tiny embedding model: NDCG@10 after one epoch 0.44 document-first vs 0.33 query-first),
# and a serving stack can cache a page's prefix across queries.
_PAIR_PART = (
    "{{% for message in messages %}}{{% if message['role'] == '{role}' %}}{label}"
    "{{% if message['content'] is string %}}{{{{ message['content'] }}}}{{% else %}}{{% for c in message['content'] %}}"
    "{{% if c['type'] == 'image' %}}<|vision_start|><|image_pad|><|vision_end|>"
    "{{% elif c['type'] == 'text' %}}{{{{ c['text'] }}}}{{% endif %}}{{% endfor %}}{{% endif %}}{{{{ '\\n' }}}}"
    "{{% endif %}}{{% endfor %}}"
)
RERANK_CHAT_TEMPLATE = (
    "<|im_start|>system\n"
    "{% set ns = namespace(instruction='Judge whether the Document is relevant to the Query. "
    "Answer 1 for yes, 0 for no.') %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{% set ns.instruction = message['content'] if message['content'] is string else message['content'][0]['text'] %}"
    "{% endif %}{% endfor %}{{ ns.instruction }}<|im_end|>\n<|im_start|>user\n"
    + _PAIR_PART.format(role="document", label="Document: ")
    + _PAIR_PART.format(role="query", label="Query: ")
    + "<|im_end|>\n<|im_start|>assistant\n"
)


def _chat_template(value: str | None) -> str | None:
    if value is None:
        return None
    if value == "builtin":
        return RERANK_CHAT_TEMPLATE
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"reranker.chat_template={value!r} is neither 'builtin' nor a template file")
    return path.read_text()


def _token_id(tokenizer, token: str, key: str) -> int:
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"reranker.{key}={token!r} is {len(ids)} tokens for this tokenizer; pick a single-token "
                         f"answer (e.g. '1'/'0' or 'yes'/'no')")
    return ids[0]


def build_reranker(model_cfg: ModelConfig, cfg: RerankerConfig, *, precision: str = "fp32", device: str = "cpu"):
    """Load the CrossEncoder on ``device``."""
    from sentence_transformers import CrossEncoder
    from sentence_transformers.base.modules import Dense, Transformer
    from sentence_transformers.cross_encoder.modules import LogitScore
    from sentence_transformers.sentence_transformer.modules import Pooling

    from dist_vdr.models.build import check_model_path, has_modules_json, model_load_kwargs

    path = check_model_path(model_cfg.name_or_path, "make-tiny-model --reranker")
    load_kwargs = model_load_kwargs(model_cfg, precision, device.startswith("cuda"))
    processor_kwargs = dict(model_cfg.processor_kwargs)
    template = _chat_template(cfg.chat_template)
    if template is not None:
        processor_kwargs["chat_template"] = template
    config_kwargs = {"trust_remote_code": True} if model_cfg.trust_remote_code else None
    head = cfg.head
    if head == "auto" and has_modules_json(path):
        model = CrossEncoder(path, device=device, trust_remote_code=model_cfg.trust_remote_code,
                             model_kwargs=load_kwargs, processor_kwargs=processor_kwargs or None)
    else:
        head = "logit_score" if head == "auto" else head
        task = "any-to-any" if head == "logit_score" else "feature-extraction"
        transformer = Transformer(path, transformer_task=task, model_kwargs=load_kwargs,
                                  processor_kwargs=processor_kwargs or None, config_kwargs=config_kwargs)
        true_id = _token_id(transformer.tokenizer, cfg.true_token, "true_token")
        false_id = _token_id(transformer.tokenizer, cfg.false_token, "false_token")
        if head == "logit_score":
            modules = [transformer, LogitScore(true_token_id=true_id, false_token_id=false_id)]
        else:
            import torch

            hidden = transformer.get_embedding_dimension()
            rows = lm_head_rows(path, [true_id, false_id], transformer)
            dense = Dense(hidden, 1, bias=True, activation_function=None,
                          init_weight=(rows[0] - rows[1]).reshape(1, hidden).float(), init_bias=torch.zeros(1),
                          module_output_name="scores")
            modules = [transformer, Pooling(hidden, "lasttoken"), dense]
        model = CrossEncoder(modules=modules, device=device)
        logger.info("reranker %s: %s head", path, head)
    if model.num_labels != 1:
        raise ValueError(f"{path} scores {model.num_labels} labels per pair; a reranker needs one score")
    if model_cfg.gradient_checkpointing:
        model[0].model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def lm_head_rows(path: str, token_ids: list[int], transformer) -> torch.Tensor:
    """Rows ``token_ids`` of the checkpoint's LM head ([len(token_ids), hidden], on CPU).

    A model with tied embeddings has no head tensor: the input embedding rows are the head. The
    head is read from the safetensors files, not loaded as a model (a second copy of the weights).
    """
    import torch
    from safetensors import safe_open

    config = transformer.model.config
    text_config = getattr(config, "text_config", config)
    tied = getattr(config, "tie_word_embeddings", False) or getattr(text_config, "tie_word_embeddings", False)
    if not tied:
        for file in _safetensors_files(path):
            with safe_open(file, framework="pt") as f:
                key = next((k for k in f.keys() if k.endswith("lm_head.weight")), None)  # noqa: SIM118 (not a dict)
                if key is not None:
                    head = f.get_slice(key)  # reads only the requested rows
                    return torch.stack([head[i:i + 1][0] for i in token_ids])
        logger.warning("%s has no lm_head.weight; initialising the dense head from the input embeddings", path)
    embeddings = transformer.model.get_input_embeddings().weight.detach()
    return embeddings[token_ids].cpu()


def _safetensors_files(path: str) -> list[str]:
    folder = Path(path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(path, allow_patterns=["*.safetensors", "*.json"]))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [str(folder / n) for n in names]
    return [str(p) for p in sorted(folder.glob("*.safetensors"))]
