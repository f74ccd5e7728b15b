"""Retrieval evaluation. ``stock`` wraps sentence-transformers' InformationRetrievalEvaluator (one per dim)."""
