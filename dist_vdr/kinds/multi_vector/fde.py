"""Fixed dimensional encodings of token sets (MUVERA, Dhulipala et al. 2024): one vector per query and per page
whose inner product approximates their MaxSim score, so that an inner-product search (faiss) can pick a page's
candidates before the exact MaxSim of the two-stage search (:mod:`dist_vdr.retrieval.two_stage`).

Written here from the paper's description (no maintained library offers it for torch tensors: fastembed's
implementation is numpy inside an ONNX runtime package). Per repetition r of ``repetitions``:

- ``bits`` random hyperplanes split the token space into ``2**bits`` buckets (a token's bucket: the signs of its
  inner products with them);
- a token is projected to ``proj_dim`` values by a random +-1 matrix (/ sqrt(proj_dim));
- a query's block of bucket b is the SUM of its tokens' projections in b; a page's block is their MEAN, and an
  empty bucket of a page takes the projection of the page token whose sign pattern is nearest (Hamming) to b.

So <query FDE, page FDE> = sum over query tokens of <token, mean of the page's tokens in its bucket>: close to the
token's best match when similar tokens share buckets. The encoding is ``repetitions * 2**bits * proj_dim`` values
(defaults 40 x 4 x 16 = 2,560). On `dist-vdr bench eval-multi-vector`'s 20k-page corpus (1,000 queries), the share
of the exact NDCG@10 kept with 300 / 400 / 500 candidates: 40 x 4 x 16: 98.2 / 99.5 / 99.8 %; 80 x 4 x 8: 98.6 / 99.5
/ 99.5 %; 40 x 2 x 32: 97.6 / 99.0 / 98.9 %; 20 x 4 x 32: - / 98.3 / 99.2 %; with 5,120 values (twice the first
stage's cost) 40 x 4 x 32: 99.0 / 100.1 / 100.0 %, 20 x 8 x 32: - / 98.8 / -; identity projections (``proj_dim`` =
D) no better. Chosen on that corpus (docs/benchmarks.md: another seed's). Deterministic given ``seed``: every rank
builds the same hyperplanes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

BITS, REPETITIONS, PROJ_DIM, SEED = 2, 40, 16, 0
"""The encodings' defaults (module docstring)."""


class FixedDimensionalEncoder:
    """MUVERA's encodings of ``dim``-dimensional token vectors (see the module)."""

    def __init__(self, dim: int, *, bits: int = BITS, repetitions: int = REPETITIONS, proj_dim: int = PROJ_DIM,
                 seed: int = SEED) -> None:
        if bits < 1 or repetitions < 1 or proj_dim < 1:
            raise ValueError("bits, repetitions and proj_dim must be >= 1")
        g = torch.Generator().manual_seed(seed)
        self.dim, self.bits, self.repetitions, self.proj_dim = dim, bits, repetitions, proj_dim
        self.planes = torch.randn(repetitions, dim, bits, generator=g)  # [R, D, bits]
        signs = torch.randint(0, 2, (repetitions, dim, proj_dim), generator=g).float() * 2 - 1
        self.projection = signs / proj_dim ** 0.5  # [R, D, proj_dim]
        self.buckets = 2 ** bits
        self._planes_flat = self.planes.permute(1, 0, 2).reshape(dim, -1)  # [D, R * bits]
        self._bit_values = 2 ** torch.arange(bits)

    @staticmethod
    def tag(bits: int = BITS, repetitions: int = REPETITIONS, proj_dim: int = PROJ_DIM, seed: int = SEED) -> str:
        """The encodings' parameters, for a file name."""
        return f"muvera-b{bits}-r{repetitions}-p{proj_dim}-s{seed}"

    @property
    def size(self) -> int:
        """Values per encoding."""
        return self.repetitions * self.buckets * self.proj_dim

    def _buckets(self, tokens: Tensor) -> Tensor:
        """``[n, R]`` each of ``n`` tokens' bucket in every repetition: one matrix product for all of them."""
        n, R = len(tokens), self.repetitions
        signs = (tokens @ self._planes_flat > 0).view(n, R, self.bits).to(torch.int32)
        return (signs * self._bit_values.to(torch.int32)).sum(-1).long()

    def encode(self, items: Sequence[Tensor], query: bool) -> Tensor:
        """``[len(items), size]`` float32: the encodings of token sets ``items`` (each ``[T_i, D]``, unpadded: a
        page's padding would weigh in its means; a query's zero vectors add nothing). ``query``: sums, else means
        with empty buckets filled. Layout: repetition, then bucket, then the projected values.

        The projection is linear, so each bucket's tokens are summed first and the sums projected: ``2**bits``
        projections per item and repetition, not one per token."""
        n = len(items)
        if n == 0:
            return torch.zeros(0, self.size)
        counts = torch.tensor([len(t) for t in items])
        tokens = torch.cat([t.float() for t in items]) if counts.sum() else torch.zeros(0, self.dim)
        owner = torch.repeat_interleave(torch.arange(n), counts)
        bucket = self._buckets(tokens)  # [N, R]
        R, B, P = self.repetitions, self.buckets, self.proj_dim
        out = torch.zeros(n, R, B, P)
        for r in range(R):
            slot = owner * B + bucket[:, r]  # (item, bucket)
            block = (torch.zeros(n * B, self.dim).index_add_(0, slot, tokens) @ self.projection[r]).view(n, B, P)
            if not query:
                hits = torch.bincount(slot, minlength=n * B).view(n, B)
                block /= hits.clamp(min=1)[..., None]
                empty = (hits == 0) & (counts > 0)[:, None]  # a page without tokens stays zeros
                if empty.any():
                    item, code = empty.nonzero(as_tuple=True)
                    block[item, code] = tokens[self._nearest(item, code, bucket[:, r], counts)] @ self.projection[r]
            out[:, r] = block
        return out.view(n, -1)

    def _nearest(self, item: Tensor, code: Tensor, bucket: Tensor, counts: Tensor) -> Tensor:
        """For each empty (item, bucket ``code``) of one repetition, the row of the item's token whose bucket
        (``bucket``: each token's, ``[N]``) is nearest to ``code`` by Hamming distance (the first such token)."""
        starts = torch.cumsum(counts, 0) - counts
        steps = torch.arange(int(counts[item].max()))[None, :]
        real = steps < counts[item][:, None]
        token = starts[item][:, None] + torch.where(real, steps, 0)  # [E, longest]: the item's tokens
        popcount = ((torch.arange(self.buckets)[:, None] // self._bit_values) % 2).sum(-1)  # [B]: set bits per code
        distance = popcount[bucket[token] ^ code[:, None]]
        nearest = torch.where(real, distance, self.bits + 1).argmin(dim=1)  # argmin: the first of equals
        return token[torch.arange(len(item)), nearest]
