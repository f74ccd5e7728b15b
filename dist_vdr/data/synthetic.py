"""Generated document pages: a VDR-shaped dataset a tiny model learns on a CPU in minutes.

Every page has a coloured header, a chart of one of four kinds with 2-5 parts, filler text lines
and a size drawn from real page shapes (portrait A4/Letter, landscape, slides). The query names the
three attributes in one of several phrasings; each hard negative differs from the positive page in
exactly one attribute, so the model must read all three. Every row is drawn from its own
``random.Random(seed, index)``, so the output is the same for a seed whatever the chunking.

Layout on disk (a ``datasets.DatasetDict`` written with ``save_to_disk``):
- ``train``: ``query``, ``image``, ``negative_0..k`` (Image feature), like the published VDR data,
  and ``document_id`` / ``negative_k_document_id`` (pages with the same attributes share an id);
- ``eval_queries`` (``query_id``, ``query``), ``eval_corpus`` (``page_id``, ``image``) and
  ``eval_qrels`` (``query_id``, ``page_id``, ``score``): held-out pages never seen in training.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (214, 39, 40),
    "orange": (255, 127, 14),
    "yellow": (230, 200, 20),
    "green": (44, 160, 44),
    "teal": (23, 190, 207),
    "blue": (31, 80, 200),
    "purple": (148, 103, 189),
    "pink": (240, 120, 190),
}
CHARTS = {"bar chart": "bars", "pie chart": "slices", "line chart": "points", "table": "rows"}
# The `forms` style (a second page kind with a vocabulary of its own, for mixtures): a coloured side band
# and a row of 2-5 symbols instead of a header and a chart.
SYMBOLS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds"}
STYLES = ("charts", "forms")
COUNTS = (2, 3, 4, 5)
_NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}
_TEMPLATES = (
    "a page with a {colour} header and a {chart} with {n} {parts}",
    "{chart} with {n} {parts} under a {colour} header",
    "find the page with a {colour} header showing a {chart} of {n} {parts}",
    "which page has a {n}-{part} {chart} and a {colour} header",
)
_FORM_TEMPLATES = (
    "a form with a {colour} side band and {n} {parts}",
    "{n} {parts} on a form with a {colour} band",
    "find the form showing {n} {parts} next to a {colour} band",
)
# (width, height) shapes of real pages at ~20 px per inch: A4/Letter portrait, landscape, 16:9 slides.
_PAGE_SHAPES = ((165, 233), (170, 220), (233, 165), (256, 144), (150, 212))
MARKER_FILE = "dist_vdr_pages.json"

Attributes = tuple[str, str, int]  # (colour, chart, count)


@dataclass(kw_only=True)
class SyntheticPagesSpec:
    """How many pages to generate, and from which seed."""

    num_train: int = 2000
    """Training rows (query, positive page, hard negatives)."""
    num_negatives: int = 1
    """Hard-negative columns ``negative_0..k-1`` per training row."""
    num_eval_queries: int = 128
    """Held-out queries; each has one relevant page. At most the number of attribute combinations (128)."""
    num_eval_distractors: int = 0
    """Extra held-out pages relevant to no query (made of repeated attribute combinations would be
    ambiguous, so they are hard negatives of eval queries: one attribute differs)."""
    seed: int = 0
    style: str = "charts"
    """charts: a coloured header and a chart; forms: a coloured side band and a row of symbols (another
    vocabulary: two styles make a tiny mixture of datasets)."""

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {list(STYLES)}, got {self.style!r}")
        combos = len(all_attributes(self.style))
        if self.num_train < 1:
            raise ValueError(f"num_train must be >= 1, got {self.num_train}")
        if not 0 <= self.num_negatives <= 4:
            raise ValueError(f"num_negatives must be in 0..4, got {self.num_negatives}")
        if not 1 <= self.num_eval_queries <= combos:
            raise ValueError(f"num_eval_queries must be in 1..{combos} (one per attribute combination)")
        if self.num_eval_distractors < 0:
            raise ValueError("num_eval_distractors must be >= 0")


def all_attributes(style: str = "charts") -> list[Attributes]:
    return list(itertools.product(COLOURS, SYMBOLS if style == "forms" else CHARTS, COUNTS))


def describe(attrs: Attributes, rng: random.Random) -> str:
    """One natural-language query for a page with these attributes."""
    colour, chart, n = attrs
    number = str(n) if rng.random() < 0.5 else _NUMBER_WORDS[n]
    if chart in SYMBOLS:
        return rng.choice(_FORM_TEMPLATES).format(colour=colour, n=number, parts=SYMBOLS[chart])
    parts = CHARTS[chart]
    return rng.choice(_TEMPLATES).format(colour=colour, chart=chart, n=number, parts=parts, part=parts[:-1])


def perturb(attrs: Attributes, rng: random.Random) -> Attributes:
    """The same attributes with exactly one changed: a hard negative."""
    colour, chart, n = attrs
    which = rng.randrange(3)
    if which == 0:
        colour = rng.choice([c for c in COLOURS if c != colour])
    elif which == 1:
        kinds = SYMBOLS if chart in SYMBOLS else CHARTS
        chart = rng.choice([c for c in kinds if c != chart])
    else:
        n = rng.choice([c for c in COUNTS if c != n])
    return colour, chart, n


def render_page(attrs: Attributes, rng: random.Random) -> Image.Image:
    """Draw one page. Layout, sizes, filler and part sizes vary with ``rng``; the attributes do not."""
    colour, chart, n = attrs
    if chart in SYMBOLS:
        return _render_form(attrs, rng)
    w, h = rng.choice(_PAGE_SHAPES)
    scale = rng.uniform(0.9, 1.2)
    w, h = int(w * scale), int(h * scale)
    paper = tuple(rng.randint(242, 255) for _ in range(3))
    img = Image.new("RGB", (w, h), paper)
    d = ImageDraw.Draw(img)
    header_h = int(h * rng.uniform(0.10, 0.16))
    d.rectangle([0, 0, w, header_h], fill=COLOURS[colour])
    # Filler "text" lines: gray bars of random length above and below the chart.
    y = header_h + 6
    chart_top = int(h * rng.uniform(0.30, 0.42))
    while y < chart_top - 6:
        d.rectangle([8, y, 8 + int((w - 16) * rng.uniform(0.4, 1.0)), y + 3], fill=(120, 120, 120))
        y += 9
    box = (int(w * 0.12), chart_top, int(w * 0.88), chart_top + int(h * rng.uniform(0.35, 0.45)))
    _draw_chart(d, chart, n, box, rng)
    y = box[3] + 8
    while y < h - 8:
        d.rectangle([8, y, 8 + int((w - 16) * rng.uniform(0.3, 1.0)), y + 3], fill=(120, 120, 120))
        y += 9
    return img


def _render_form(attrs: Attributes, rng: random.Random) -> Image.Image:
    """A `forms` page: a coloured band down the left side, filler lines, and ``n`` symbols in a row."""
    colour, symbol, n = attrs
    w, h = rng.choice(_PAGE_SHAPES)
    img = Image.new("RGB", (w, h), tuple(rng.randint(230, 245) for _ in range(3)))
    d = ImageDraw.Draw(img)
    band = int(w * rng.uniform(0.10, 0.16))
    d.rectangle([0, 0, band, h], fill=COLOURS[colour])
    for y in range(8, int(h * 0.35), 9):
        d.rectangle([band + 8, y, band + 8 + int((w - band - 16) * rng.uniform(0.3, 1.0)), y + 3], fill=(90, 90, 90))
    size = min((w - band - 16) // (n + 1), int(h * 0.2))
    top = int(h * rng.uniform(0.45, 0.6))
    for k in range(n):
        x = band + 8 + k * (size + size // max(n, 1))
        box = [x, top, x + size, top + size]
        if symbol == "circle":
            d.ellipse(box, fill=(40, 40, 40))
        elif symbol == "square":
            d.rectangle(box, fill=(40, 40, 40))
        elif symbol == "triangle":
            d.polygon([(x, top + size), (x + size // 2, top), (x + size, top + size)], fill=(40, 40, 40))
        else:
            d.polygon([(x + size // 2, top), (x + size, top + size // 2), (x + size // 2, top + size),
                       (x, top + size // 2)], fill=(40, 40, 40))
    return img


def _draw_chart(d: ImageDraw.ImageDraw, chart: str, n: int, box: tuple[int, int, int, int], rng: random.Random) -> None:
    x0, y0, x1, y1 = box
    ink = (40, 40, 40)
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    if chart == "bar chart":
        slot = (x1 - x0) / n
        for i in range(n):
            top = y1 - (y1 - y0) * rng.uniform(0.25, 1.0)
            d.rectangle([x0 + i * slot + slot * 0.2, top, x0 + (i + 1) * slot - slot * 0.2, y1], fill=(60, 60, 60))
        d.line([x0, y1, x1, y1], fill=ink, width=2)
    elif chart == "pie chart":
        side = min(x1 - x0, y1 - y0)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        bbox = [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]
        weights = [rng.uniform(0.6, 1.4) for _ in range(n)]
        start = rng.uniform(0, 360)
        for i, wgt in enumerate(weights):
            extent = 360 * wgt / sum(weights)
            d.pieslice(bbox, start, start + extent, fill=palette[i], outline=(255, 255, 255), width=2)
            start += extent
    elif chart == "line chart":
        xs = [x0 + (x1 - x0) * (i + 0.5) / n for i in range(n)]
        ys = [y1 - (y1 - y0) * rng.uniform(0.1, 0.9) for _ in range(n)]
        d.line(list(zip(xs, ys, strict=True)), fill=(31, 119, 180), width=2)
        for x, y in zip(xs, ys, strict=True):
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(214, 39, 40))
        d.line([x0, y1, x1, y1], fill=ink, width=1)
        d.line([x0, y0, x0, y1], fill=ink, width=1)
    else:  # table: n rows with a shaded header row
        row_h = (y1 - y0) / (n + 1)
        d.rectangle([x0, y0, x1, y0 + row_h], fill=(200, 200, 200))
        for i in range(n + 2):
            yy = y0 + i * row_h
            d.line([x0, yy, x1, yy], fill=ink, width=2)
        for xx in (x0, (x0 + x1) / 2, x1):
            d.line([xx, y0, xx, y0 + (n + 1) * row_h], fill=ink, width=2)


def _png(img: Image.Image) -> dict:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return {"bytes": buf.getvalue(), "path": None}


def document_id(attrs: Attributes) -> str:
    """Pages with the same attributes are renderings of the same content: one "document" (the same
    answer to a query). Mining uses it to avoid picking such a page as a negative."""
    colour, chart, count = attrs
    return f"{colour}/{chart}/{count}"


def _train_row(spec: SyntheticPagesSpec, index: int, combos: list[Attributes]) -> dict:
    rng = random.Random(f"{spec.seed}/train/{index}")
    attrs = rng.choice(combos)
    row = {"query": describe(attrs, rng), "image": _png(render_page(attrs, rng)), "document_id": document_id(attrs)}
    for k in range(spec.num_negatives):
        negative = perturb(attrs, rng)
        row[f"negative_{k}"] = _png(render_page(negative, rng))
        row[f"negative_{k}_document_id"] = document_id(negative)
    return row


FORMAT = 2  # 2: training rows carry document ids


def _marker(spec: SyntheticPagesSpec) -> dict:
    marker = {**asdict(spec), "format": FORMAT}
    if spec.style == "charts":  # the folders written before styles existed keep their marker
        marker.pop("style")
    return marker


def _eval_rows(spec: SyntheticPagesSpec, combos: list, show_progress: bool) -> tuple[list, list, list]:
    """(queries, corpus pages, qrels) of the eval splits: one relevant page per query, plus distractors."""
    from tqdm.auto import tqdm

    rng = random.Random(f"{spec.seed}/eval")
    eval_combos = rng.sample(combos, spec.num_eval_queries)
    queries, pages, qrels = [], [], []
    for i, attrs in enumerate(tqdm(eval_combos, desc="eval pages", disable=not show_progress)):
        queries.append({"query_id": f"q{i}", "query": describe(attrs, rng)})
        pages.append({"page_id": f"p{i}", "image": _png(render_page(attrs, rng))})
        qrels.append({"query_id": f"q{i}", "page_id": f"p{i}", "score": 1})
    for j in range(spec.num_eval_distractors):
        attrs = perturb(eval_combos[j % len(eval_combos)], rng)
        if attrs in eval_combos:  # would be a second relevant page for some query: keep the corpus unambiguous
            attrs = perturb(attrs, rng)
            if attrs in eval_combos:
                continue
        pages.append({"page_id": f"d{j}", "image": _png(render_page(attrs, rng))})
    return queries, pages, qrels


def generate_pages(out_dir: str | os.PathLike, spec: SyntheticPagesSpec | None = None, *, overwrite: bool = False,
                   show_progress: bool = True) -> Path:
    """Generate the dataset into ``out_dir`` (atomic: temporary folder, then rename). Returns the folder.

    A complete dataset already there with the same spec is kept; anything else there is refused
    unless ``overwrite``.
    """
    import datasets
    from tqdm.auto import tqdm

    spec = spec or SyntheticPagesSpec()
    from dist_vdr.outputs import Output

    out = Path(out_dir)
    Output("make-synthetic-pages", "DIR", out).refuse_file()
    if out.exists() and any(out.iterdir()) and not overwrite:
        marker = out / MARKER_FILE
        previous = json.loads(marker.read_text()) if marker.is_file() else None
        if previous == _marker(spec):
            return out
        # Our own pages from an older layout (no document ids): regenerate them in place.
        if not (previous and {k: v for k, v in previous.items() if k != "format"} ==
                {k: v for k, v in _marker(spec).items() if k != "format"}):
            raise ValueError(f"{out} exists and holds something else; choose another folder or pass --overwrite")

    combos = all_attributes(spec.style)
    image = datasets.Image()
    neg_cols = [f"negative_{k}" for k in range(spec.num_negatives)]
    text = datasets.Value("string")
    train_features = datasets.Features({"query": text, "image": image, **{c: image for c in neg_cols},
                                        "document_id": text, **{f"{c}_document_id": text for c in neg_cols}})
    rows = [_train_row(spec, i, combos)
            for i in tqdm(range(spec.num_train), desc="train pages", disable=not show_progress)]
    train = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in train_features}, features=train_features)

    queries, pages, qrels = _eval_rows(spec, combos, show_progress)
    ds = datasets.DatasetDict({
        "train": train,
        "eval_queries": datasets.Dataset.from_list(queries),
        "eval_corpus": datasets.Dataset.from_list(pages, features=datasets.Features(
            {"page_id": datasets.Value("string"), "image": image})),
        "eval_qrels": datasets.Dataset.from_list(qrels),
    })
    with Output("make-synthetic-pages", "DIR", out, replace_any=True).check().writing() as tmp:
        ds.save_to_disk(str(tmp))
        (tmp / MARKER_FILE).write_text(json.dumps(_marker(spec), indent=2))
    return out


__all__ = ["SyntheticPagesSpec", "generate_pages", "render_page", "describe", "perturb", "all_attributes"]
