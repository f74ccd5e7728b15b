"""Planning a `dist-vdr pages build`: which pages of which files are done (from the manifest's
records), and the missing page ranges packed into shards of work units."""

from __future__ import annotations

from dist_vdr.data.ingest_config import PagesBuildConfig


def _kept_pages(document_pages: int, cfg: PagesBuildConfig) -> int:
    return min(document_pages, cfg.max_pages_per_document)


def _coverage(records: list[dict]) -> dict[str, tuple[int, set[int]]]:
    """file -> (its page count, the pages done)."""
    done: dict[str, tuple[int, set[int]]] = {}
    for r in records:
        done.setdefault(r["file"], (r["document_pages"], set()))[1].update(range(r["first_page"], r["last_page"] + 1))
    return done


def _complete_files(coverage: dict[str, tuple[int, set[int]]], cfg: PagesBuildConfig) -> dict[str, int]:
    """file -> page count, for the files whose kept pages are all done."""
    return {f: n for f, (n, pages) in coverage.items() if pages.issuperset(range(1, _kept_pages(n, cfg) + 1))}


def _missing_ranges(kept: int, done: set[int], size: int) -> list[tuple[int, int]]:
    """The pages 1..kept not in ``done`` as ranges of at most ``size`` pages."""
    ranges: list[tuple[int, int]] = []
    for page in range(1, kept + 1):
        if page in done:
            continue
        if ranges and ranges[-1][1] == page - 1 and ranges[-1][1] - ranges[-1][0] + 1 < size:
            ranges[-1] = (ranges[-1][0], page)
        else:
            ranges.append((page, page))
    return ranges


def plan_shards(page_counts: dict[str, int], coverage: dict[str, tuple[int, set[int]]],
                cfg: PagesBuildConfig) -> list[list[tuple]]:
    """The missing page ranges, in file order, packed into shards of at most ``pages_per_shard``
    pages and ``files_per_shard`` units; a unit is (file, first page, last page, document pages)."""
    shards, shard, pages = [], [], 0
    for rel, document_pages in page_counts.items():
        done = coverage.get(rel, (0, set()))[1]
        for first, last in _missing_ranges(_kept_pages(document_pages, cfg), done, cfg.pages_per_shard):
            n = last - first + 1
            if shard and (pages + n > cfg.pages_per_shard or len(shard) == cfg.files_per_shard):
                shards.append(shard)
                shard, pages = [], 0
            shard.append((rel, first, last, document_pages))
            pages += n
    if shard:
        shards.append(shard)
    return shards
