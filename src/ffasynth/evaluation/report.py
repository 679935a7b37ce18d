"""Offline HTML reports with a Markdown twin, for any experiment (metrics, clinical, baselines).

    report = Report("Title", intro="one paragraph")
    report.add_text("Settings", "free text; blank lines split paragraphs")
    report.add_table("Metrics", ["method", "PSNR ↑"], [["ours", Cell(31.2, "31.2 ± 1.3")]],
                     best={"PSNR ↑": "max"}, note="shown under the table")
    report.add_figures("ROC curves", [("fold 1", Path("roc.png"))])          # any image files
    report.add_grid("Examples", ["source", "real", "generated"], [("7.1", [p1, p2, None])])
    paths = report.write(folder)  # {"html": folder/report.html, "markdown": folder/summary.md}

Cells are str, int, float or `Cell(value, text)` (numeric value for ranking, text to show);
floats print with 4 significant digits, inf as "inf", NaN as "-". `best` marks the best value of
a column (bold, and ★ in HTML). Figures and grid images are copied into `folder/images/`
(formats a browser may not show, e.g. BMP/TIFF, converted to PNG) unless they already lie inside
`folder`, and each gets a thumbnail in `folder/images/thumbs/` that links to the full-size file.
The HTML has inline CSS only: no scripts, fonts or links outside the folder, so it opens offline.
Grids are left out of the Markdown (it is for a paper's tables); figures appear as image links.
"""

from __future__ import annotations

import html
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch.nn.functional as F

from ffasynth.data.io import read_image, save_image
from ffasynth.files import atomic_write_text

BROWSER_FORMATS = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".svg")
THUMBNAIL_SIDE = 256


@dataclass(frozen=True)
class Cell:
    value: float | None
    text: str


def format_value(value) -> str:
    if isinstance(value, Cell):
        return value.text
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.4g}"
    return str(value)


def _numeric(value) -> float | None:
    value = value.value if isinstance(value, Cell) else value
    if isinstance(value, bool) or not isinstance(value, int | float) or value is None or math.isnan(value):
        return None
    return float(value)


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list]
    best: dict[str, str] = field(default_factory=dict)  # column → "max" or "min"
    note: str = ""

    def best_rows(self, column: str) -> set[int]:
        """Indices of the rows holding the column's best value (ties all marked; none for one row)."""
        if column not in self.best or len(self.rows) < 2:
            return set()
        index = self.columns.index(column)
        values = {i: _numeric(row[index]) for i, row in enumerate(self.rows)}
        values = {i: v for i, v in values.items() if v is not None}
        if not values:
            return set()
        target = max(values.values()) if self.best[column] == "max" else min(values.values())
        return {i for i, v in values.items() if v == target}


@dataclass
class Text:
    title: str
    text: str


@dataclass
class Figures:
    title: str
    figures: list[tuple[str, Path]]


@dataclass
class Grid:
    title: str
    columns: list[str]
    rows: list[tuple[str, list[Path | None]]]


class Report:
    """Sections in order of addition; `write` renders them to report.html and summary.md."""

    def __init__(self, title: str, intro: str = ""):
        self.title = title
        self.intro = intro
        self.sections: list[Table | Text | Figures | Grid] = []

    def add_text(self, title: str, text: str) -> Report:
        self.sections.append(Text(title, text))
        return self

    def add_table(
        self, title: str, columns: list[str], rows: list[list], best: dict[str, str] | None = None, note: str = ""
    ) -> Report:
        if any(len(row) != len(columns) for row in rows):
            raise ValueError(f"table {title!r}: every row needs {len(columns)} cells")
        unknown = [c for c, how in (best or {}).items() if c not in columns or how not in ("max", "min")]
        if unknown:
            raise ValueError(f"table {title!r}: best needs existing columns and 'max'/'min', not {unknown}")
        self.sections.append(Table(title, list(columns), [list(r) for r in rows], dict(best or {}), note))
        return self

    def add_figures(self, title: str, figures: list[tuple[str, Path] | Path]) -> Report:
        items = [(f.name, Path(f)) if isinstance(f, str | Path) else (f[0], Path(f[1])) for f in figures]
        self.sections.append(Figures(title, items))
        return self

    def add_grid(self, title: str, columns: list[str], rows: list[tuple[str, list[Path | None]]]) -> Report:
        if any(len(images) != len(columns) for _, images in rows):
            raise ValueError(f"grid {title!r}: every row needs {len(columns)} images (None for an empty cell)")
        self.sections.append(Grid(title, list(columns), [(label, list(images)) for label, images in rows]))
        return self

    def write(self, folder: str | Path) -> dict[str, Path]:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        assets = _Assets(folder)
        html_path = atomic_write_text(folder / "report.html", self._html(assets))
        markdown_path = atomic_write_text(folder / "summary.md", self._markdown(assets))
        return {"html": html_path, "markdown": markdown_path}

    def _html(self, assets: _Assets) -> str:
        parts = [f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{_e(self.title)}</title>"]
        parts.append(f"<style>{CSS}</style></head><body><h1>{_e(self.title)}</h1>")
        if self.intro:
            parts.append(_paragraphs(self.intro))
        for section in self.sections:
            parts.append(f"<section><h2>{_e(section.title)}</h2>")
            if isinstance(section, Text):
                parts.append(_paragraphs(section.text))
            elif isinstance(section, Table):
                parts.append(_html_table(section))
            elif isinstance(section, Figures):
                parts.append("<div class='figures'>")
                for caption, path in section.figures:
                    full, thumb = assets.add(path)
                    parts.append(
                        f"<figure>{_thumb(full, thumb, caption)}<figcaption>{_e(caption)}</figcaption></figure>"
                    )
                parts.append("</div>")
            else:
                head = "".join(f"<th>{_e(c)}</th>" for c in ["", *section.columns])
                parts.append(f"<table class='grid'><tr>{head}</tr>")
                for label, images in section.rows:
                    cells = [
                        f"<td>{_thumb(*assets.add(path), f'{label} {column}')}</td>" if path else "<td>–</td>"
                        for column, path in zip(section.columns, images, strict=True)
                    ]
                    parts.append(f"<tr><th>{_e(label)}</th>{''.join(cells)}</tr>")
                parts.append("</table><p class='note'>Click a thumbnail for the full-size image.</p>")
            parts.append("</section>")
        parts.append("</body></html>\n")
        return "\n".join(parts)

    def _markdown(self, assets: _Assets) -> str:
        lines = [f"# {self.title}", ""]
        if self.intro:
            lines += [self.intro, ""]
        for section in self.sections:
            if isinstance(section, Grid):
                continue
            lines += [f"## {section.title}", ""]
            if isinstance(section, Text):
                lines += [section.text, ""]
            elif isinstance(section, Figures):
                lines += [f"![{caption}]({assets.add(path)[0]})" for caption, path in section.figures] + [""]
            else:
                lines += [_md_row(section.columns), _md_row(["---"] * len(section.columns))]
                best = {c: section.best_rows(c) for c in section.best}
                for i, row in enumerate(section.rows):
                    cells = [format_value(v) for v in row]
                    cells = [
                        f"**{t}**" if i in best.get(c, ()) else t for c, t in zip(section.columns, cells, strict=True)
                    ]
                    lines.append(_md_row(cells))
                lines += ["", *([section.note, ""] if section.note else [])]
        return "\n".join(lines)


class _Assets:
    """Copies images into the report folder once each and makes their thumbnails."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.done: dict[Path, tuple[str, str]] = {}

    def add(self, path: Path) -> tuple[str, str]:
        """(full-size, thumbnail) paths relative to the report folder."""
        path = Path(path).resolve()
        if path in self.done:
            return self.done[path]
        root = self.folder.resolve()
        if path.is_relative_to(root) and path.suffix.lower() in BROWSER_FORMATS:
            full = path
        else:
            full = root / "images" / f"{len(self.done):04d}_{path.stem}"
            full = full.with_suffix(path.suffix.lower() if path.suffix.lower() in BROWSER_FORMATS else ".png")
            full.parent.mkdir(parents=True, exist_ok=True)
            if full.suffix == path.suffix.lower():
                shutil.copyfile(path, full)
            else:
                save_image(read_image(path), full)
        rel = full.relative_to(root)
        thumb = root / "images" / "thumbs" / rel.relative_to("images" if rel.parts[0] == "images" else ".")
        thumb = thumb.with_suffix(".png")
        if full.suffix == ".svg":
            thumb = full
        else:
            image = read_image(full)
            scale = THUMBNAIL_SIDE / max(image.shape[-2:])
            if scale < 1:
                size = (max(1, round(image.shape[-2] * scale)), max(1, round(image.shape[-1] * scale)))
                image = F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
            save_image(image.clamp(0, 1), thumb)
        self.done[path] = (rel.as_posix(), thumb.relative_to(root).as_posix())
        return self.done[path]


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222;max-width:1600px}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}
td.best{font-weight:bold;background:#e3f4e3}
table.grid td{padding:2px;text-align:center}table.grid img{display:block;max-width:256px}
.figures{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0}figure img{max-width:256px;display:block}
.note{color:#555;font-size:.9em}
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _paragraphs(text: str) -> str:
    return "".join(f"<p>{_e(p).replace(chr(10), '<br>')}</p>" for p in text.strip().split("\n\n") if p.strip())


def _thumb(full: str, thumb: str, alt: str) -> str:
    return f"<a href='{_e(full)}'><img src='{_e(thumb)}' alt='{_e(alt)}' loading='lazy'></a>"


def _html_table(table: Table) -> str:
    best = {c: table.best_rows(c) for c in table.best}
    head = "".join(f"<th>{_e(c)}</th>" for c in table.columns)
    rows = []
    for i, row in enumerate(table.rows):
        cells = []
        for column, value in zip(table.columns, row, strict=True):
            marked = i in best.get(column, ())
            text = _e(format_value(value)) + (" ★" if marked else "")
            cells.append(f"<td class='best'>{text}</td>" if marked else f"<td>{text}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    note = f"<p class='note'>{_e(table.note)}</p>" if table.note else ""
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>{note}"


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
