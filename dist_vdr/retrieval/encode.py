"""Encode this rank's shard of a page corpus, and the queries, for the sharded evaluator.

Pages are decoded and preprocessed (processor: resize, patchify, chat template) in DataLoader
workers, in batches of similar page area (less padding), and only the forward pass runs in the
main process. Nothing travels between ranks here: each rank reads its own contiguous slice of the
``datasets`` corpus. Batches are formed inside fixed blocks of up to ``MAX_BLOCK_BATCHES`` batches of
the corpus (sorted by area within a block; the block size depends on the corpus size only), and
shards are whole blocks: every batch holds the same pages whatever the number of ranks, so the
embeddings, and the rankings built on them, do not change with it (a batch's padding changes the
floating-point result of its pages). An optional on-disk cache keeps finished batches per shard,
so an interrupted evaluation of a large corpus continues where it stopped. A cache entry is keyed by
what its embeddings depend on (model weights and configuration, processor settings, prompt, the
shard's page contents, batching); anything else encodes into a fresh sub-folder.

The corpus is only read: nothing here writes into the dataset's folder (``datasets`` transforms such
as ``cast`` would write a full copy of the pages there as ``cache-*.arrow``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dist_vdr import distributed
from dist_vdr.distributed import shard_range, shard_sizes  # noqa: F401  (the evaluators import them from here)
from dist_vdr.retrieval.scoring import PAGE, Scoring, resolve
from dist_vdr.retrieval.token_store import TokenStore

MAX_BLOCK_BATCHES = 8


def block_size(n: int, batch_size: int) -> int:
    """Pages per block: up to MAX_BLOCK_BATCHES batches, and at least 32 blocks when the corpus allows,
    so that whole-block shards stay balanced. Depends on the corpus, never on the number of ranks."""
    return batch_size * max(1, min(MAX_BLOCK_BATCHES, n // (batch_size * 32)))


def corpus_shard_range(n: int, rank: int, world_size: int, block: int) -> tuple[int, int]:
    """Rank's contiguous [start, end) of an n-page corpus, in whole blocks."""
    first, last = shard_range(-(-n // block), rank, world_size)
    return min(first * block, n), min(last * block, n)


def block_batches(areas: np.ndarray, batch_size: int, block: int) -> list[list[int]]:
    """Batches of shard positions: each block (from the shard's start) sorted by decreasing area, cut
    into batch_size pieces. Depends only on the pages of the block, not on the number of ranks."""
    batches = []
    for start in range(0, len(areas), block):
        order = start + np.argsort(-areas[start:start + block], kind="stable")
        batches += [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    return batches


def _scan_pages(shard, image_column: str, digest: bool = False) -> tuple[np.ndarray, str]:
    """(pixel area of each page from its image header, no full decode; SHA-256 of the pages' contents
    in order, or "" when ``digest`` is false).

    Reads the raw Arrow column batch by batch: no ``cast``/``map``, which would write a decoded-flag
    copy of the pages into the dataset's folder, and at most one batch of page bytes in memory.
    """
    from PIL import Image

    areas = np.empty(len(shard), dtype=np.int64)
    hasher = hashlib.sha256()
    i = 0
    for table in shard.select_columns([image_column]).with_format("arrow").iter(batch_size=256):
        for value in table.column(image_column).to_pylist():
            data = value.get("bytes")
            if digest:
                hasher.update(_page_signature(value))
            with Image.open(io.BytesIO(data) if data else value["path"]) as im:
                areas[i] = im.width * im.height
            i += 1
    return areas, hasher.hexdigest() if digest else ""


def _page_signature(value: dict) -> bytes:
    """What identifies a page's content: its bytes, or for a page stored as a file path the path, size
    and modification time (reading every file again only to hash it would double the I/O)."""
    if value.get("bytes"):
        data = value["bytes"]
        return b"B%d:" % len(data) + hashlib.sha256(data).digest()
    stat = os.stat(value["path"])
    return f"P{value['path']}:{stat.st_size}:{stat.st_mtime_ns};".encode()


def _weights_digest(model) -> str:
    """Every parameter's name, shape, dtype, sum and sum of squares (float64): a finetuned model differs
    even where only some layers were trained. Chunked, so no float64 copy of a large matrix is made."""
    hasher = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            total = squares = 0.0
            for chunk in p.detach().reshape(-1).split(1 << 22):
                chunk = chunk.double()
                total += float(chunk.sum())
                squares += float((chunk * chunk).sum())
            hasher.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{total!r}:{squares!r};".encode())
    return hasher.hexdigest()


def _settings_digest(model) -> str:
    """Module configurations (pooling, normalisation...) and processor settings (min/max pixels,
    resizing, chat template): they change the embeddings without changing the weights."""
    parts = []
    for module in model if isinstance(model, torch.nn.Sequential) else [model]:
        config = module.get_config_dict() if hasattr(module, "get_config_dict") else {}
        processor = getattr(module, "processor", None)
        parts.append({"module": type(module).__name__, "config": config,
                      "processor": processor.to_json_string() if hasattr(processor, "to_json_string") else
                      repr(processor)})
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()


def embedding_key(model, *, image_column: str, batch_size: int, block: int, extra: str = "") -> dict:
    """What a shard's cached embeddings depend on, apart from its pages (see :func:`encode_corpus_shard`)."""
    first = next(model.parameters(), None)
    return {"weights": _weights_digest(model), "settings": _settings_digest(model),
            "prompt": document_prompt(model), "image_column": image_column, "batch_size": batch_size,
            "block": block, "device": torch.device(model.device).type,  # bf16 autocast on GPUs only
            "dtype": str(first.dtype) if first is not None else "", "extra": extra}


class _Pages(torch.utils.data.Dataset):
    def __init__(self, shard, image_column: str) -> None:
        self.shard, self.image_column = shard, image_column

    def __len__(self) -> int:
        return len(self.shard)

    def __getitem__(self, j: int):
        return j, self.shard[j][self.image_column].convert("RGB")


@dataclass
class _Collate:
    """Runs in DataLoader workers: the processor turns PIL pages into model inputs (as the scoring prepares
    a page batch)."""

    model: object
    prompt: str | None
    scoring: Scoring

    def __call__(self, items):
        positions = [j for j, _ in items]
        feats = self.scoring.prepare(self.model, [im for _, im in items], PAGE, self.prompt)
        return positions, feats


def auto_workers(device, world_size: int) -> int:
    """No workers on CPU (they would compete with the forward pass); on GPUs up to 4 per rank."""
    if torch.device(device).type == "cpu":
        return 0
    return max(1, min(4, (os.cpu_count() or 1) // max(1, world_size) - 1))


def document_prompt(model) -> str | None:
    """The prompt encode_document would use (first of document/passage/corpus the model defines)."""
    prompts = getattr(model, "prompts", None) or {}
    for name in ("document", "passage", "corpus"):
        if name in prompts:
            return prompts[name]
    return None


def autocast(device: torch.device):
    """bf16 autocast on CUDA; none on CPU (float32 there)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@contextlib.contextmanager
def inference(model):
    """``model`` in eval mode without gradients (bf16 autocast on CUDA), its train mode restored after.
    no_grad, not inference_mode: FSDP2 writes its gathered parameters into storages that outlive the
    forward, which inference tensors may not."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(model.device):
            yield
    finally:
        model.train(was_training)


def encode_corpus_shard(model, corpus, *, rank: int, world_size: int, image_column: str = "image",
                        batch_size: int = 16, num_workers: int = 0, cache_dir: str | None = None,
                        cache_key: str = "", show_progress: bool = False,
                        scoring: Scoring | None = None) -> tuple[int, torch.Tensor]:
    """Embed rank's shard of ``corpus``; returns (global offset of the shard, [n, D] float32 representations:
    ``scoring``'s output key made its stored representation -- by default normalised ``sentence_embedding``).

    ``cache_dir``: finished batches are kept in a sub-folder named by the shard and by everything its
    embeddings depend on (:func:`embedding_key` + the shard's page contents; ``cache_key``: anything
    else the caller adds; the scoring's ``cache_tag``), so a different model, corpus, preprocessing or
    representation never reuses them.
    """
    plan = _ShardPlan(model, corpus, rank, world_size, image_column, batch_size, cache_key, resolve(scoring),
                      digest=bool(cache_dir))
    cache = _ShardCache(cache_dir, rank, world_size, plan.start, plan.end, plan.key) if cache_dir else None
    done = cache.load() if cache else {}

    def keep(positions, emb):
        for p, e in zip(positions, emb, strict=True):
            done[p] = e
        if cache:
            cache.save(positions, emb)

    plan.encode(model, done, keep, num_workers=num_workers, show_progress=show_progress)
    if plan.size == 0:
        return plan.start, torch.empty(0, 0)
    return plan.start, plan.scoring.stack([done[i] for i in range(plan.size)], PAGE)


def encode_corpus_store(model, corpus, store_root: str | os.PathLike, *, rank: int, world_size: int,
                        image_column: str = "image", batch_size: int = 16, num_workers: int = 0,
                        cache_key: str = "", show_progress: bool = False,
                        scoring: Scoring) -> tuple[int, TokenStore]:
    """Embed rank's shard of ``corpus`` into a :class:`~dist_vdr.retrieval.token_store.TokenStore` (each page
    ``scoring.trim``-ed, in ``scoring.store_dtype``) in a sub-folder of ``store_root`` keyed as
    :func:`encode_corpus_shard`'s cache is: an interrupted encoding continues there, another model, corpus or
    preprocessing gets a folder of its own. Returns (global offset of the shard, the store). Memory: one batch."""
    plan = _ShardPlan(model, corpus, rank, world_size, image_column, batch_size, cache_key, scoring, digest=True)
    manifest = {"start": plan.start, "end": plan.end, "key": plan.key, "dtype": scoring.store_dtype}
    folder = _keyed_folder(store_root, "tokens", rank, world_size, manifest)
    _pin_manifest(folder, manifest)
    store = TokenStore.open(folder, size=plan.size, dtype=scoring.store_dtype)

    def keep(positions, emb):
        store.append(positions, [scoring.trim(e, PAGE) for e in emb])

    plan.encode(model, store.stored, keep, num_workers=num_workers, show_progress=show_progress)
    return plan.start, store


class _ShardPlan:
    """Rank's shard of a corpus and its batches (whole blocks; :func:`block_batches`), with what its encodings are
    keyed by (:func:`embedding_key` + the pages' digest when ``digest``)."""

    def __init__(self, model, corpus, rank: int, world_size: int, image_column: str, batch_size: int,
                 cache_key: str, scoring: Scoring, digest: bool) -> None:
        self.scoring, self.rank, self.world_size = scoring, rank, world_size
        self.image_column, self.batch_size = image_column, batch_size
        if scoring.cache_tag():
            cache_key = f"{cache_key}|scoring={scoring.cache_tag()}"
        self.block = block_size(len(corpus), batch_size)
        self.start, self.end = corpus_shard_range(len(corpus), rank, world_size, self.block)
        # a small corpus may leave a rank none
        self.shard = corpus.select(range(self.start, self.end) if self.end > self.start else [])
        self.size = len(self.shard)
        self.areas, pages_digest = _scan_pages(self.shard, image_column, digest=digest)
        self.key = {**embedding_key(model, image_column=image_column, batch_size=batch_size, block=self.block,
                                    extra=cache_key), "pages": pages_digest} if digest else {}

    def encode(self, model, done, keep, *, num_workers: int, show_progress: bool) -> None:
        """Encode the batches with a position not in ``done``; ``keep(positions, representations)`` per batch."""
        from sentence_transformers.util import batch_to_device
        from tqdm.auto import tqdm

        scoring, world_size = self.scoring, self.world_size
        # A stored batch is whole: the batches still to run are exactly those of the uninterrupted run.
        batches = [b for b in block_batches(self.areas, self.batch_size, self.block)
                   if not all(p in done for p in b)] if len(done) < self.size else []
        # Sharded engines (ZeRO-3, FSDP2) gather parameters inside every forward: a collective, so all
        # ranks must run the same number of forwards. Ranks with fewer batches run padding forwards.
        my_batches = len(batches)
        num_batches = max(distributed.all_gather_objects(my_batches)) if world_size > 1 else my_batches
        if not num_batches:
            return
        # Workers are forked: the collate function holds the model's processor (and the module
        # around it), which a spawn/forkserver start would pickle into every worker (measured: 30x
        # slower inside a spawned rank). Where fork is unavailable, preprocess in this process.
        fork = "fork" in multiprocessing.get_all_start_methods()
        workers = (auto_workers(model.device, world_size) if num_workers < 0 else num_workers) if fork else 0
        loader = torch.utils.data.DataLoader(
            _Pages(self.shard, self.image_column), batch_sampler=batches, num_workers=workers,
            collate_fn=_Collate(model, document_prompt(model), scoring), persistent_workers=False,
            multiprocessing_context="fork" if workers else None,
        )
        device = model.device
        with inference(model):
            for positions, feats in tqdm(loader, desc=f"encoding pages (rank {self.rank})",
                                         disable=not show_progress):
                keep(positions, scoring.forward(model, batch_to_device(feats, device), PAGE).cpu())
            for _ in range(num_batches - my_batches):  # lockstep padding, result discarded
                scoring.forward(model, batch_to_device(_blank_page_features(model, scoring), device), PAGE)


def _keyed_folder(root: str | os.PathLike, prefix: str, rank: int, world_size: int, manifest: dict) -> Path:
    """A rank's folder under ``root`` named by a digest of ``manifest``: another model, corpus or preprocessing gets a
    folder of its own, never another's encodings."""
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    return Path(root) / f"{prefix}-{rank}-of-{world_size}-{digest}"


def _pin_manifest(folder: Path, manifest: dict) -> None:
    """``folder`` belongs to ``manifest`` (written on first use; a folder of another is an error)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "manifest.json"
    if path.is_file() and json.loads(path.read_text()) != manifest:  # only if edited by hand
        raise ValueError(f"embedding cache {folder} belongs to another model, corpus or split "
                         f"({path.read_text()}); delete that folder")
    path.write_text(json.dumps(manifest))


def _blank_page_features(model, scoring: Scoring):
    from PIL import Image

    return scoring.prepare(model, [Image.new("RGB", (64, 64), "white")], PAGE, document_prompt(model))


def encode_queries(model, texts: list[str], *, batch_size: int = 32, scoring: Scoring | None = None) -> torch.Tensor:
    """float32 query representations on CPU from sentence-transformers' encode_query (``scoring``'s output
    key and representation; by default the normalised ``sentence_embedding``)."""
    if not texts:
        return torch.empty(0, 0)
    return resolve(scoring).encode_queries(model, texts, batch_size)


class _ShardCache:
    """Finished batches of one shard as small atomic files; a manifest pins what they belong to.

    The folder name carries a digest of the manifest: another model, corpus or preprocessing gets a
    folder of its own (re-encoded from scratch), never another's embeddings.
    """

    def __init__(self, cache_dir: str, rank: int, world_size: int, start: int, end: int, key: dict) -> None:
        self.manifest = {"start": start, "end": end, "key": key}
        self.dir = _keyed_folder(cache_dir, "shard", rank, world_size, self.manifest)
        self.count = 0

    def load(self) -> dict[int, torch.Tensor]:
        _pin_manifest(self.dir, self.manifest)
        done: dict[int, torch.Tensor] = {}
        for f in sorted(self.dir.glob("batch-*.pt")):
            positions, emb = torch.load(f, weights_only=True)
            for p, e in zip(positions.tolist(), emb, strict=True):
                done[p] = e
            self.count += 1
        return done

    def save(self, positions: list[int], emb: torch.Tensor) -> None:
        name = self.dir / f"batch-{self.count:07d}.pt"
        tmp = name.with_suffix(".tmp")
        torch.save((torch.tensor(positions), emb.clone()), tmp)
        os.replace(tmp, name)
        self.count += 1
