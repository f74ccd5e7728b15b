"""task: embedding -- a SentenceTransformer (bi-encoder): one vector per query and page, cosine scores.

``task.py`` (the Task: config rules, model, loss, evaluation, headline); the shared machinery it builds on
(``dist_vdr.models``, ``dist_vdr.losses``, ``dist_vdr.retrieval``) imports no kind.
"""

from dist_vdr.kinds import Kind

KIND = Kind(
    task="dist_vdr.kinds.embedding.task:EmbeddingTask",
    losses=("cmnrl", "mnrl"),
    options=("loss.matryoshka_dims", "loss.matryoshka_weights", "loss.false_negatives", "loss.distillation",
             "data.datasets", "model.adapter"),
)
