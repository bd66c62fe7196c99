"""ingest: read charts from Chart-to-Text, keep those an IELTS Task 1 essay can describe.

``data.source`` is either a folder with ``manifest.jsonl`` (the bundled sample's layout) or a checkout of
the Chart-to-Text repository (``{statista,pew}_dataset/dataset/{imgs,data,titles,metadata.csv}`` and
their ``multiColumn/`` twins). Output under ``<run.id>/ingest/``: ``charts.jsonl`` (accepted charts),
``rejected.jsonl`` (every other chart, with a human-readable reason) and ``images/<id>.<ext>``.
Accepted + rejected = charts read, always; a single bad chart never stops the stage.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import artifacts
from pipeline.context import StageContext
from pipeline.errors import StageError

# Chart-to-Text labels -> IELTS Task 1 chart types. Anything else is rejected with a reason.
TYPE_MAP = {"bar": "bar", "column": "bar", "line": "line", "pie": "pie", "table": "table"}
SOURCES = ("statista", "pew")
KEEP_FORMATS = {"PNG": "png", "JPEG": "jpg"}  # other formats (GIF, WEBP, ...) are re-encoded as PNG


@dataclass
class Candidate:
    """One chart as found in the source, before any check."""

    id: str | None  # None: a manifest line that is not a chart (see line)
    source: str
    source_type: str
    title: str | None
    image: Path
    data: Path | None
    data_format: str | None  # "csv_table" | "ocr_text" | None
    extra: dict[str, Any]
    line: int | None = None  # its manifest.jsonl line; a line that is not a chart has no id (id None)


class Rejected(Exception):
    pass


# --------------------------------------------------------------------------- reading sources


def read_manifest(root: Path) -> list[Candidate]:
    """One Candidate per manifest line; a line that cannot be one (not UTF-8, not a JSON object with an id)
    becomes a Candidate without an id carrying the reason (``extra["error"]``), so it is rejected with it,
    by its line number, and never stops the stage or takes a real chart's id."""
    out = []
    for n, raw in enumerate((root / "manifest.jsonl").read_bytes().split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            out.append(_bad_line(root, n, f"is not UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1})"))
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            raw_id = row["id"]
        except (json.JSONDecodeError, KeyError, TypeError):
            out.append(_bad_line(root, n, "is not a JSON object with an 'id'"))
            continue
        if not isinstance(raw_id, (str, int)) or isinstance(raw_id, bool):
            out.append(_bad_line(root, n, f"has an 'id' that is not a string ({type(raw_id).__name__})"))
            continue
        data = row.get("data")
        extra: dict[str, Any] = {k: row[k] for k in ("summary", "source_url", "complexity") if row.get(k)}
        title = row.get("title")
        if title is not None and not isinstance(title, str):
            extra["error"] = f"title is not a string ({type(title).__name__})"
        for field, value in (("image", row.get("image", "")), ("data", data)):
            if value is not None and (not isinstance(value, str) or not _inside(root, value)):
                extra["error"] = f"{field} path {str(value)[:80]!r} leaves data.source"
        out.append(Candidate(
            id=str(raw_id), source=str(row.get("source", "")), source_type=str(row.get("chart_type", "")).lower(),
            title=title if isinstance(title, str) else None, image=root / str(row.get("image", "")),
            data=root / str(data) if data else None, data_format=row.get("data_format"), extra=extra, line=n))
    return out


def _bad_line(root: Path, n: int, why: str) -> Candidate:
    return Candidate(None, "?", "?", None, root / "?", None, None,
                     {"error": f"manifest.jsonl line {n} {why}"}, line=n)


def _inside(root: Path, relative: str) -> bool:
    """``relative`` names a file under ``root`` (lexically: no absolute path, no ``..`` out of it; a symlink
    inside the folder is the owner's choice)."""
    path = os.path.normpath(os.path.join(root, relative))
    return bool(relative) and not os.path.isabs(relative) and "\x00" not in relative and \
        path.startswith(os.path.normpath(root) + os.sep)


MAX_ID_CHARS = 150  # escaped: the judge's item ids add a comparison and an order (pipeline.records.MAX_KEY_CHARS)


def check_id(chart_id: str) -> None:
    """A chart id must map to one store key and back (pipeline.records.safe_id: any text, escaped into one
    name): not empty, no control characters, at most MAX_ID_CHARS escaped."""
    from pipeline.errors import PipelineError
    from pipeline.records import safe_id

    if not chart_id.strip():
        raise Rejected("chart id is empty")
    try:
        too_long = len(safe_id(chart_id)) > MAX_ID_CHARS
    except PipelineError:
        too_long = True
    if too_long:
        raise Rejected(f"chart id {chart_id[:60]!r} is not usable as a key (a control character, or longer than "
                       f"{MAX_ID_CHARS} characters escaped)")


def _metadata(folder: Path) -> dict[str, dict[str, str]]:
    path = folder / "metadata.csv"
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8", errors="replace", newline="") as fh:
        return {str(r.get("id", "")).strip(): r for r in csv.DictReader(fh)}


def _type_of(meta: dict[str, str]) -> str:
    for key, value in meta.items():
        if key and key.strip().lower() in ("charttype", "chart_type", "graphtype", "type") and value:
            return value.strip().lower()
    return ""


def _numeric_key(path: Path) -> tuple[int, str]:
    return (int(path.stem), "") if path.stem.isdigit() else (1 << 62, path.stem)


def read_checkout(root: Path) -> list[Candidate]:
    """A Chart-to-Text checkout: ids are ``<source>-{two_col,multi_col}-<N>`` like the sample's."""
    out = []
    for source in SOURCES:
        for sub, complexity in (("", "two_col"), ("multiColumn", "multi_col")):
            folder = root / f"{source}_dataset" / "dataset" / sub
            if not (folder / "imgs").is_dir():
                continue
            meta = _metadata(folder)
            for image in sorted((folder / "imgs").iterdir(), key=_numeric_key):
                if not image.is_file():
                    continue
                n = image.stem
                row = meta.get(n, {})
                title_file = folder / "titles" / f"{n}.txt"
                title = title_file.read_text(encoding="utf-8", errors="replace") if title_file.is_file() \
                    else row.get("title")
                csv_file, txt_file = folder / "data" / f"{n}.csv", folder / "data" / f"{n}.txt"
                data, fmt = (csv_file, "csv_table") if csv_file.is_file() else \
                    (txt_file, "ocr_text") if txt_file.is_file() else (None, None)
                extra = {"complexity": "simple" if not sub else "complex"}
                if row.get("URL"):
                    extra["source_url"] = row["URL"]
                out.append(Candidate(f"{source}-{complexity}-{n}", source, _type_of(row), title, image,
                                     data, fmt, extra))
    return out


def read_source(source: str) -> list[Candidate]:
    root = Path(source).expanduser()
    if (root / "manifest.jsonl").is_file():
        return read_manifest(root)
    if any((root / f"{s}_dataset" / "dataset").is_dir() for s in SOURCES):
        return read_checkout(root)
    raise StageError(f"data.source {source!r}: expected a folder with manifest.jsonl or a Chart-to-Text "
                     "checkout (statista_dataset/dataset, pew_dataset/dataset)")


# --------------------------------------------------------------------------- checking one chart


def load_image(path: Path, max_pixels: int, min_side: int) -> tuple[bytes, str, int, int]:
    """Decode the whole image (a header check misses truncated files); returns bytes to store."""
    from PIL import Image, UnidentifiedImageError

    from pipeline.models.images import to_rgb

    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise Rejected(f"image missing: {path.name}") from None
    except OSError as exc:
        raise Rejected(f"image unreadable: {path.name} ({exc.strerror})") from None
    try:
        with Image.open(io.BytesIO(raw)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise Rejected(f"image too large: {width}x{height} px exceeds data.max_pixels={max_pixels}")
            if min(width, height) < min_side:
                raise Rejected(f"image too small: {width}x{height} px (data.min_side={min_side})")
            img.load()
            fmt = img.format or ""
            transparent = "A" in img.getbands() or "transparency" in img.info
            if fmt in KEEP_FORMATS and not transparent:
                return raw, KEEP_FORMATS[fmt], width, height
            buf = io.BytesIO()  # other formats, and transparency composited on white (as the chart was meant)
            to_rgb(img).save(buf, "PNG")
            return buf.getvalue(), "png", width, height
    except Rejected:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).split("\n")[0][:160] or exc.__class__.__name__
        raise Rejected(f"image undecodable: {path.name} ({reason})") from None


def load_table(path: Path, fmt: str | None) -> tuple[list[list[str]] | None, str | None]:
    """(rows, ocr_text): a CSV table as rows (header first), or Pew's OCR text (not a table)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise Rejected(f"data file missing: {path.name}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise Rejected(f"data file unreadable: {path.name} ({exc.__class__.__name__})") from None
    if fmt == "ocr_text" or path.suffix == ".txt":
        return None, re.sub(r"\s+", " ", text).strip() or None
    try:
        rows = [[c.strip() for c in r] for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
    except csv.Error as exc:
        raise Rejected(f"data file unreadable: {path.name} (CSV: {exc})") from None
    if len(rows) < 2:
        raise Rejected(f"data file unreadable: {path.name} (no data rows)")
    return rows, None


def check(c: Candidate, max_pixels: int, min_side: int) -> tuple[dict[str, Any], bytes]:
    if c.id is None:
        raise Rejected(c.extra["error"])
    check_id(c.id)
    if "error" in c.extra:
        raise Rejected(c.extra["error"])
    ielts_type = TYPE_MAP.get(c.source_type)
    if ielts_type is None:
        raise Rejected(f"chart type '{c.source_type or 'unknown'}' has no IELTS Task 1 equivalent"
                       if c.source_type else "chart type unknown (no chartType in the source metadata)")
    title = re.sub(r"\s+", " ", c.title or "").strip()
    if not title:
        raise Rejected("title missing or empty")
    table, ocr_text = load_table(c.data, c.data_format) if c.data else (None, None)
    data, ext, width, height = load_image(c.image, max_pixels, min_side)
    chart = {"id": c.id, "type": ielts_type, "title": title, "source": c.source, "source_type": c.source_type,
             "image": None, "image_format": ext, "width": width, "height": height,
             "table": table, "ocr_text": ocr_text, **c.extra}
    return chart, data


# --------------------------------------------------------------------------- the stage


def run(ctx: StageContext) -> None:
    from tqdm import tqdm

    cfg = ctx.config.data
    candidates = read_source(cfg.source)[:: cfg.stride]
    if cfg.limit:
        candidates = candidates[: cfg.limit]
    counts = Counter(c.id for c in candidates if c.id is not None)
    first = {c.id: i for i, c in reversed(list(enumerate(candidates)))}
    dupes = {i for i, c in enumerate(candidates) if c.id is not None and counts[c.id] > 1 and first[c.id] != i}

    def one(item: tuple[int, Candidate]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        i, c = item
        try:
            if i in dupes:
                raise Rejected("duplicate chart id")
            chart, data = check(c, cfg.max_pixels, cfg.min_side)
            chart["image"] = artifacts.image_key(ctx, c.id, chart["image_format"])
            ctx.store.put_bytes(chart["image"], data)
            return chart, None
        except Rejected as why:
            where = {} if c.line is None else {"line": c.line}
            return None, {"id": c.id, **where, "source": c.source, "source_type": c.source_type, "reason": str(why)}

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(tqdm(pool.map(one, enumerate(candidates)), total=len(candidates), desc="ingest", unit="chart",
                            disable=None))
    accepted = [a for a, _ in results if a]
    rejected = [r for _, r in results if r]
    assert len(accepted) + len(rejected) == len(candidates)
    ctx.store.put_jsonl(ctx.key(artifacts.CHARTS), accepted)
    ctx.store.put_jsonl(ctx.key(artifacts.REJECTED), rejected)
    reasons = Counter(re.sub(r" line \d+", "", r["reason"]).split(":")[0].split(" (")[0] for r in rejected)
    summary = {"read": len(candidates), "accepted": len(accepted), "rejected": len(rejected),
               "by_type": dict(Counter(a["type"] for a in accepted)), "rejected_by_reason": dict(reasons)}
    ctx.log.info("ingest: %d read, %d accepted (%s), %d rejected (%s)", len(candidates), len(accepted),
                 ", ".join(f"{k} {v}" for k, v in sorted(summary["by_type"].items())), len(rejected),
                 ", ".join(f"{k}: {v}" for k, v in reasons.most_common()) or "none")
    ctx.complete(summary)
