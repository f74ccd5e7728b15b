"""Multimodal rerankers (cross-encoders over a text query and a page image): model, losses, mining, evaluation."""
