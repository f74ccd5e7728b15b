"""A generated folder of PDFs and scans with queries and qrels: the input `dist-vdr pages build` expects.

It exercises the path from documents to a finetuned model offline: multi-page PDFs (written by PIL,
one image per page at ``ppi`` pixels per inch) and single-page scans (PNG/JPEG) of the generated
pages of :mod:`.synthetic`, plus ``train_queries.jsonl`` / ``train_qrels.trec`` and
``eval_queries.jsonl`` / ``eval_qrels.trec`` naming pages by the ids `pages build` gives them
(``<relative path>#<page number>``). A query describes a page's attributes; every page with those
attributes is relevant (they are renderings of the same content). Training queries come from the
pages of training documents, evaluation queries from the held-out documents (one per attribute
combination), judged against the whole corpus, as in a real deployment. Training qrels grade the
page a query was written for 2 and the other renderings of its content 1.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from dist_vdr.data.judgements import write_qrels_trec, write_queries_jsonl
from dist_vdr.data.synthetic import Attributes, all_attributes, describe, render_page

MARKER_FILE = "dist_vdr_pdfs.json"


@dataclass(kw_only=True)
class SyntheticPdfSpec:
    num_documents: int = 40
    """PDF files; each has 1..max_pages_per_document pages."""
    max_pages_per_document: int = 8
    num_scans: int = 20
    """Single-page image files (PNG and JPEG) under scans/."""
    eval_fraction: float = 0.2
    """Share of documents (and scans) whose pages give the evaluation queries."""
    ppi: float = 20.0
    """Pixels per inch of the embedded page images (generated pages are ~165x233 px)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_documents < 1 or self.max_pages_per_document < 1 or self.num_scans < 0:
            raise ValueError("num_documents and max_pages_per_document must be >= 1, num_scans >= 0")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")


def generate_pdf_folder(out_dir: str | Path, spec: SyntheticPdfSpec | None = None, *,
                        overwrite: bool = False) -> Path:
    spec = spec or SyntheticPdfSpec()
    out = Path(out_dir)
    marker = json.dumps(asdict(spec), sort_keys=True)
    from dist_vdr.outputs import Output

    Output("make-synthetic-pdfs", "DIR", out).refuse_file()
    if out.exists():
        if not overwrite and (out / MARKER_FILE).is_file() and (out / MARKER_FILE).read_text() == marker:
            return out  # already generated with this spec (the output is deterministic)
        if not overwrite and any(out.iterdir()):
            raise ValueError(f"{out} exists with other content; pass --overwrite to replace it")
    with Output("make-synthetic-pdfs", "DIR", out, replace_any=True).check().writing() as tmp:
        pages = _render_pages(spec, tmp / "documents")
        train_q, train_rel, eval_q, eval_rel = _queries(spec, pages)
        if not train_q or not eval_q:
            raise ValueError("too few documents for both training and evaluation queries; raise num_documents")
        write_queries_jsonl(tmp / "train_queries.jsonl", train_q)
        write_qrels_trec(tmp / "train_qrels.trec", train_rel)
        write_queries_jsonl(tmp / "eval_queries.jsonl", eval_q)
        write_qrels_trec(tmp / "eval_qrels.trec", eval_rel)
        (tmp / MARKER_FILE).write_text(marker)
    return out


def _render_pages(spec: SyntheticPdfSpec, docs: Path) -> list[tuple[str, Attributes, bool]]:
    """Write the PDFs and scans under ``docs``; returns (page id, attributes, held out) per page."""
    (docs / "reports").mkdir(parents=True)
    (docs / "scans").mkdir()
    combos = all_attributes()
    pages: list[tuple[str, Attributes, bool]] = []
    for d in range(spec.num_documents):
        rng = random.Random(f"{spec.seed}/doc/{d}")
        held_out = rng.random() < spec.eval_fraction
        attrs = [rng.choice(combos) for _ in range(rng.randint(1, spec.max_pages_per_document))]
        images = [render_page(a, rng) for a in attrs]
        rel = f"reports/report-{d:05d}.pdf"
        images[0].save(docs / rel, save_all=True, append_images=images[1:], resolution=spec.ppi)
        pages += [(f"{rel}#{i + 1}", a, held_out) for i, a in enumerate(attrs)]
    for s in range(spec.num_scans):
        rng = random.Random(f"{spec.seed}/scan/{s}")
        held_out = rng.random() < spec.eval_fraction
        attrs = rng.choice(combos)
        rel = f"scans/scan-{s:05d}.{'png' if s % 2 == 0 else 'jpg'}"
        render_page(attrs, rng).save(docs / rel, dpi=(spec.ppi, spec.ppi))
        pages.append((f"{rel}#1", attrs, held_out))
    return pages


def _queries(spec: SyntheticPdfSpec, pages: list[tuple[str, Attributes, bool]]):
    """(train queries, train qrels, eval queries, eval qrels): one training query per page that is
    not held out, one eval query per distinct content among the held-out pages."""
    by_attrs: dict[Attributes, list[str]] = {}
    for pid, attrs, _ in pages:
        by_attrs.setdefault(attrs, []).append(pid)
    rng = random.Random(f"{spec.seed}/queries")
    train_q, train_rel, eval_q, eval_rel = {}, {}, {}, {}
    for i, (pid, attrs, held_out) in enumerate(pages):
        if not held_out:
            qid = f"train-{i:06d}"
            train_q[qid] = describe(attrs, rng)
            # Grade 2: the page the query was written for (the training positive); grade 1: other
            # renderings of the same content, which mining must not take as negatives.
            train_rel[qid] = {**dict.fromkeys(by_attrs[attrs], 1), pid: 2}
    seen: set[Attributes] = set()
    for _pid, attrs, held_out in pages:
        if held_out and attrs not in seen:
            seen.add(attrs)
            qid = f"eval-{len(eval_q):06d}"
            eval_q[qid] = describe(attrs, rng)
            eval_rel[qid] = dict.fromkeys(by_attrs[attrs], 1)  # every rendering of that content
    return train_q, train_rel, eval_q, eval_rel
