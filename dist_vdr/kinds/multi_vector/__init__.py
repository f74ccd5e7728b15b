"""task: multi-vector (late interaction, ColBERT / ColPali-style) -- under construction (issue #35).

So far: its score rule (``scoring.py``: token embeddings ``[N, T, D]`` scored by MaxSim) and its model
(``model.py``: sentence-transformers' MultiVectorEncoder over a Qwen3-VL backbone, its forward as token embeddings
and scoring mask); the kind is not registered yet (no ``KIND``, no Task).
"""
