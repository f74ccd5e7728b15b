"""task: reranker -- a multimodal cross-encoder (a text query and a page image in, one score out).

Everything of the reranker's lives in this package: its config section (``config.py``), the model and its head
(``model.py``), the losses (``loss.py``), the mined rows and first-stage candidates (``prepare.py``), the
retrieve-and-rerank evaluation (``evaluation.py``), pair scoring (``scoring.py``) and the Task (``task.py``).
"""

from dist_vdr.kinds import Kind

KIND = Kind(
    task="dist_vdr.kinds.reranker.task:RerankerTask",
    losses=("bce", "listwise"),
    section=("reranker", "dist_vdr.kinds.reranker.config:RerankerConfig"),
    options=("loss.pos_weight", "loss.num_in_batch_negatives"),
    recognizes="dist_vdr.models.build:is_cross_encoder",
)
