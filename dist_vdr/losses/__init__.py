"""The loss plumbing every kind shares: the global-batch contrastive loss with its constant exchange
(:mod:`.global_batch`), its variant for large representations that exchanges queries and scores instead of pages
(:mod:`.score_exchange`), false-negative masking (:mod:`.false_negatives`) and distillation (:mod:`.distillation`),
all scored through the kind's :class:`~dist_vdr.retrieval.scoring.Scoring`. Which loss a recipe trains is the
kind's: the embedding kind's is ``dist_vdr.kinds.embedding.loss.build_loss``.
"""
