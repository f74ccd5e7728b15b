"""task: multi_vector -- late interaction (ColBERT / ColPali-style): one vector per token, scored by MaxSim.

Everything of the kind's lives in this package: its config section (``config.py``), its score rule
(``scoring.py``: token embeddings ``[N, T, D]`` scored by MaxSim, padded without masks), its model
(``model.py``: sentence-transformers' MultiVectorEncoder over a Qwen3-VL backbone) and the Task (``task.py``).
Its loss is the shared score-exchange loss (:mod:`dist_vdr.losses.score_exchange`): queries and scores travel
between ranks, pages stay where they are.
"""

from dist_vdr.kinds import Kind

KIND = Kind(
    task="dist_vdr.kinds.multi_vector.task:MultiVectorTask",
    losses=("maxsim_infonce",),
    section=("multi_vector", "dist_vdr.kinds.multi_vector.config:MultiVectorConfig"),
    options=("loss.matryoshka_dims", "loss.matryoshka_weights", "loss.false_negatives", "loss.distillation",
             "data.datasets", "model.adapter"),
    recognizes="dist_vdr.kinds.multi_vector.model:is_multi_vector_folder",
)
