"""A hybrid model's evaluation (``multi_vector.hybrid``): its token vectors by MaxSim (the main result) and its
pooled single vector by cosine, each the shared sharded evaluator with its own score rule.

Flat keys: the token evaluator's own (``dim32_cosine_ndcg@10``: what the trainer logs, keep_best, the headline and
``metrics_*.json``'s dimension rows read), the single vector's under ``single/<key>``. Summary rows: the token
dims (``"32"``) and ``"single/<dim>"``. Output files: the token evaluator's in the output folder, the single
vector's in ``single/`` inside it.
"""

from __future__ import annotations

import os

from sentence_transformers.base.evaluation.evaluator import BaseEvaluator

SINGLE = "single"
"""The prefix of the single vector's keys and rows."""


class HybridEvaluator(BaseEvaluator):
    """dist_vdr.retrieval.protocol.RunEvaluator: the token evaluator and the single-vector evaluator (all-rank)."""

    all_ranks = True

    def __init__(self, tokens, single) -> None:
        super().__init__()
        self.tokens, self.single = tokens, single
        self.primary_metric = tokens.primary_metric
        self.dims = tokens.dims  # what `dist-vdr eval` prints: the token vectors' figures

    @property
    def last_metrics(self) -> dict:
        return self.tokens.last_metrics

    def write_outputs(self, output_path: str, steps: int = -1) -> None:
        """The token evaluator's files in ``output_path``, the single vector's in ``output_path/single``."""
        self.tokens.write_outputs(output_path, steps)
        self.single.write_outputs(os.path.join(output_path, SINGLE), steps)

    def __call__(self, model, output_path: str | None = None, epoch: int = -1, steps: int = -1) -> dict[str, float]:
        flat = dict(self.tokens(model, output_path=output_path, epoch=epoch, steps=steps))
        where = os.path.join(output_path, SINGLE) if output_path else None
        flat.update({f"{SINGLE}/{key}": value for key, value in
                     self.single(model, output_path=where, epoch=epoch, steps=steps).items()})
        return flat

    def summarise(self, raw: dict[str, float]) -> dict[str, dict[str, float]]:
        rows = {str(k): v for k, v in self.tokens.summarise(
            {key: value for key, value in raw.items() if not key.startswith(f"{SINGLE}/")}).items()}
        mine = {key[len(SINGLE) + 1:]: value for key, value in raw.items() if key.startswith(f"{SINGLE}/")}
        rows.update({f"{SINGLE}/{row}": values for row, values in self.single.summarise(mine).items()})
        return rows
