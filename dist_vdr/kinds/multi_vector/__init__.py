"""task: multi-vector (late interaction, ColBERT / ColPali-style) -- under construction (issue #35).

So far only its score rule lives here (``scoring.py``: token embeddings ``[N, T, D]`` scored by MaxSim); the
kind is not registered yet (no ``KIND``, no Task).
"""
