"""OUT/report.html: one self-contained page about a segment run, for people to look at.

Totals, throughput, failures, quality flags, histograms of the measurements, a gallery of
overlay thumbnails (the photograph with its mask in green) of the flagged and the most unusual
images, and the Dice table when ground truth was given. Everything is inline: CSS in a
<style>, histograms as SVG, thumbnails as JPEG data URIs, so the file can be mailed or
archived on its own and opens without a network.

Rows are read in one pass and only what the page shows is kept (numbers of the plotted
columns, the gallery candidates, the failures): memory stays small for 100,000 images.
"""

from __future__ import annotations

import base64
import csv
import html
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .measure import COLUMNS as MEASURE_COLUMNS
from .qc import THRESHOLDS

QC_PLOTS = {"qc_brightness": ("dark", "bright"), "qc_contrast": ("low_contrast",),
            "qc_sharpness": ("blurred",)}
DENSITY_LIMITS = ("vessel_density_low", "vessel_density_high")
SCORES = ("dice", "iou", "sensitivity", "specificity", "accuracy", "auc")
GALLERY_FLAGGED, GALLERY_UNUSUAL, THUMB_WIDTH = 18, 6, 220
MAX_LISTED = 200  # failures and Dice rows listed in full; the rest are counted


def read_rows(metrics_csv: str | os.PathLike):
    """The newest row of every output in a metrics CSV (a resumed run appends; a later row of
    the same image replaces the earlier one). Two passes, so memory holds only row numbers."""
    latest: dict[str, int] = {}
    with open(metrics_csv, newline="") as f:
        for number, row in enumerate(csv.DictReader(f)):
            latest[row.get("output") or row.get("path", "")] = number
    keep = set(latest.values())
    with open(metrics_csv, newline="") as f:
        for number, row in enumerate(csv.DictReader(f)):
            if number in keep:
                yield row


@dataclass
class _Collected:
    """What the page needs from the rows, gathered in one pass."""

    ok: int = 0
    no_fov: int = 0
    values: dict = field(default_factory=lambda: {c: [] for c in (*MEASURE_COLUMNS,
                                                                  *QC_PLOTS)})
    reasons: dict = field(default_factory=dict)
    flagged: list = field(default_factory=list)  # the first GALLERY_FLAGGED of them
    flagged_count: int = 0
    failures: list = field(default_factory=list)
    failed: int = 0
    scored: list = field(default_factory=list)
    candidates: list = field(default_factory=list)  # (path, output, measurements) of ok rows

    def add(self, row: dict) -> None:
        if row.get("status") != "ok":
            self.failed += 1
            if len(self.failures) < MAX_LISTED:  # a killed run's half row has Nones
                self.failures.append((str(row.get("path") or ""),
                                      str(row.get("message") or "")))
            return
        self.ok += 1
        self.no_fov += row.get("fov_found") in ("False", False)
        numbers = {c: _number(row.get(c)) for c in self.values}
        for column, value in numbers.items():
            if value is not None:
                self.values[column].append(value)
        qc = row.get("qc") or "ok"
        if qc != "ok":
            self.flagged_count += 1
            for reason in qc.split(";"):
                self.reasons[reason] = self.reasons.get(reason, 0) + 1
            if len(self.flagged) < GALLERY_FLAGGED:
                self.flagged.append((row["path"], row.get("output", ""), qc))
        else:
            self.candidates.append((row["path"], row.get("output", ""),
                                    [numbers[c] for c in MEASURE_COLUMNS]))
        if _number(row.get("dice")) is not None:
            self.scored.append((row["path"], *(_number(row.get(s)) for s in SCORES)))


def _number(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def write_report(out_dir: str | os.PathLike, rows, summary: dict, truth: bool = False) -> Path:
    """Write OUT/report.html from metrics rows (dicts, e.g. read_rows(OUT/metrics.csv)) and
    the run summary; `truth`: the run had ground truth (adds the Dice table). Returns the
    path. Written atomically: a crash leaves the previous report, never half a page."""
    out_dir = Path(out_dir)
    data = _Collected()
    for row in rows:
        data.add(row)
    sections = [_totals(data, summary), _quality(data), _histograms(data),
                _gallery(data, out_dir), _failures(data)]
    if truth:
        sections.append(_dice_table(data))
    page = _PAGE.format(title=html.escape(f"retina-batch report: {out_dir.name}"),
                        style=_STYLE, body="\n".join(s for s in sections if s))
    path = out_dir / "report.html"
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


# --- sections ------------------------------------------------------------------------------

def _totals(data: _Collected, summary: dict) -> str:
    counts = summary.get("counts", {})
    rate = summary.get("images_per_second")
    backend = summary.get("backend", {})
    cards = [("images measured", data.ok), ("failed", data.failed),
             ("flagged by quality control", data.flagged_count),
             ("no field of view found", data.no_fov),
             ("this run: images/s", f"{rate:.2f}" if rate else "-"),
             ("this run: done / skipped", f"{counts.get('ok', 0)} / {counts.get('skipped', 0)}")]
    stages = "".join(f"<td>{html.escape(k[:-2])}</td><td>{1000 * v:.1f} ms</td>"
                     for k, v in summary.get("mean_stage_seconds", {}).items())
    facts = (f"model <b>{html.escape(str(backend.get('model', '?')))}</b> on "
             f"{html.escape(str(backend.get('runtime', backend.get('backend', '?'))))}, "
             f"threshold {summary.get('threshold')}, wall time "
             f"{summary.get('wall_seconds', 0):.1f} s, ended {summary.get('ended', '')}"
             + (", <b>interrupted</b>" if summary.get("interrupted") else ""))
    return (f"<section id=totals><h1>retina-batch report</h1><p class=meta>{facts}</p>"
            f"<div class=cards>{''.join(_card(k, v) for k, v in cards)}</div>"
            + (f"<table class=stages><tr><th colspan=12>mean time per image, by stage"
               f"</th></tr><tr>{stages}</tr></table>" if stages else "") + "</section>")


def _card(label: str, value) -> str:
    return (f"<div class=card><div class=value>{html.escape(str(value))}</div>"
            f"<div class=label>{html.escape(label)}</div></div>")


def _quality(data: _Collected) -> str:
    if not data.ok:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(r)}</td><td class=num>{n}</td>"
        f"<td class=num>{100 * n / data.ok:.1f}%</td><td>{_rule(r)}</td></tr>"
        for r, n in sorted(data.reasons.items(), key=lambda kv: -kv[1]))
    plots = "".join(_histogram(c, data.values[c], [THRESHOLDS[t] for t in ts])
                    for c, ts in QC_PLOTS.items())
    table = (f"<table><tr><th>flag</th><th>images</th><th>share</th><th>rule</th></tr>{rows}"
             "</table>" if rows else "<p>No image was flagged.</p>")
    return (f"<section id=quality><h2>Quality control</h2>{table}"
            f"<div class=plots>{plots}</div></section>")


_RULES = {"no_fov": "no dark rim found: the whole frame was used",
          "dark": "qc_brightness < {dark}", "bright": "qc_brightness > {bright}",
          "low_contrast": "qc_contrast < {low_contrast}", "blurred": "qc_sharpness < {blurred}",
          "vessel_density_low": "vessel_density < {vessel_density_low}",
          "vessel_density_high": "vessel_density > {vessel_density_high}"}


def _rule(reason: str) -> str:
    return html.escape(_RULES.get(reason, "").format(**THRESHOLDS))


def _histograms(data: _Collected) -> str:
    if not data.ok:
        return ""
    plots = "".join(_histogram(c, data.values[c], [THRESHOLDS[t] for t in DENSITY_LIMITS]
                               if c == "vessel_density" else []) for c in MEASURE_COLUMNS)
    return (f"<section id=measurements><h2>Measurements</h2><p class=meta>On the "
            f"field-of-view-normalised grid (FOV bounding box scaled to 512 px); black line: "
            f"median; red dashed lines: quality-control limits.</p>"
            f"<div class=plots>{plots}</div></section>")


def _histogram(column: str, values: list, limits: list, bins: int = 24) -> str:
    """An inline SVG histogram with the median and any limits marked."""
    width, height, pad = 260, 120, 18
    title = f"<div class=plot><div class=plot-title>{html.escape(column)}</div>"
    if not values:
        return title + "<p class=meta>no values</p></div>"
    v = np.asarray(values, float)
    # The 1st-99th percentile (and the limits): one absurd image must not squash the rest
    # into a single bar. Values beyond are counted in the end bars and said so.
    lo, hi = np.percentile(v, [1, 99]) if v.size >= 50 else (v.min(), v.max())
    lo, hi = float(min([lo, *limits])), float(max([hi, *limits]))
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    outside = int(np.count_nonzero((v < lo) | (v > hi)))
    counts, _ = np.histogram(np.clip(v, lo, hi), bins=bins, range=(lo, hi))
    scale_x = (width - 2 * pad) / (hi - lo)
    top = max(int(counts.max()), 1)
    bar_w = (width - 2 * pad) / bins
    bars = "".join(
        f'<rect x="{pad + i * bar_w:.1f}" y="{height - pad - (height - 2 * pad) * c / top:.1f}" '
        f'width="{max(bar_w - 1, 1):.1f}" height="{(height - 2 * pad) * c / top:.1f}"/>'
        for i, c in enumerate(counts) if c)
    marks = [(float(np.median(v)), "median")] + [(x, "limit") for x in limits if lo <= x <= hi]
    lines = "".join(f'<line class="{kind}" x1="{pad + (x - lo) * scale_x:.1f}" y1="{pad - 6}" '
                    f'x2="{pad + (x - lo) * scale_x:.1f}" y2="{height - pad}"/>'
                    for x, kind in marks)
    axis = (f'<text x="{pad}" y="{height - 3}">{_fmt(lo)}</text>'
            f'<text x="{width - pad}" y="{height - 3}" text-anchor="end">{_fmt(hi)}</text>')
    svg = (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'role="img" aria-label="histogram of {html.escape(column)}">{bars}{lines}{axis}</svg>')
    note = f", {outside} beyond the axis (in the end bars)" if outside else ""
    return (f"{title}{svg}<div class=meta>median {_fmt(float(np.median(v)))}, "
            f"n = {v.size}{note}</div></div>")


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def _unusual(data: _Collected) -> list[tuple[str, str, str]]:
    """The ok, unflagged images farthest from the run's typical values: largest robust
    z-score (distance from the median in units of 1.4826 x median absolute deviation)."""
    if len(data.candidates) < 5:
        return []
    table = np.array([[np.nan if x is None else x for x in c[2]] for c in data.candidates])
    median = np.nanmedian(table, axis=0)
    spread = 1.4826 * np.nanmedian(np.abs(table - median), axis=0)
    spread[~(spread > 0)] = np.inf  # a constant column says nothing about unusual images
    z = np.nan_to_num(np.abs(table - median) / spread, nan=0.0)
    order = np.argsort(-z.max(axis=1))[:GALLERY_UNUSUAL]
    picked = []
    for i in order:
        j = int(np.argmax(z[i]))
        if z[i, j] < 2.0:
            break
        sign = "+" if table[i, j] > median[j] else "-"
        picked.append((data.candidates[i][0], data.candidates[i][1],
                       f"{MEASURE_COLUMNS[j]} {_fmt(table[i, j])} ({sign}{z[i, j]:.1f} z)"))
    return picked


def _gallery(data: _Collected, out_dir: Path) -> str:
    parts = []
    for key, title, items, total in (
            ("flagged", "Flagged by quality control", data.flagged, data.flagged_count),
            ("unusual", "Most unusual measurements (not flagged)", _unusual(data), None)):
        if not items:
            continue
        tiles = "".join(_tile(path, out_dir / output, caption)
                        for path, output, caption in items)
        shown = (f" <span class=meta>(showing {len(items)} of {total})</span>"
                 if total and total > len(items) else "")
        parts.append(f"<section id=gallery-{key}><h2>{title}{shown}</h2>"
                     f"<div class=gallery>{tiles}</div></section>")
    return "".join(parts)


def _tile(photo: str, mask: Path, caption: str) -> str:
    uri = thumbnail_uri(Path(photo), mask)
    image = (f'<img src="{uri}" alt="{html.escape(Path(photo).name)}">' if uri
             else "<div class=missing>no preview</div>")
    return (f"<figure>{image}<figcaption><b>{html.escape(Path(photo).name)}</b><br>"
            f"{html.escape(caption.replace(';', ', '))}</figcaption></figure>")


def thumbnail_uri(photo: Path, mask: Path, width: int = THUMB_WIDTH) -> str | None:
    """A small JPEG of the photograph with its mask in green, as a data URI (None when the
    photograph or the mask cannot be read: the page still shows the caption)."""
    from .io import decode, read_mask
    from .pipeline import overlay  # not at the top: pipeline imports this module
    from .preprocess import to_rgb8

    try:
        rgb = to_rgb8(decode(photo, width)[0])
        vessels = read_mask(mask).astype(np.uint8)
    except (OSError, ValueError):
        return None
    h, w = vessels.shape
    size = (width, max(1, round(h * width / w)))
    small = cv2.resize(vessels * 255, size, interpolation=cv2.INTER_AREA) >= 64
    rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    ok, jpeg = cv2.imencode(".jpg", overlay(rgb, small), [cv2.IMWRITE_JPEG_QUALITY, 80])
    return "data:image/jpeg;base64," + base64.b64encode(jpeg.tobytes()).decode() if ok else None


def _failures(data: _Collected) -> str:
    if not data.failed:
        return ""
    rows = "".join(f"<tr><td>{html.escape(p)}</td><td>{html.escape(m)}</td></tr>"
                   for p, m in data.failures)
    more = (f"<p class=meta>{data.failed - len(data.failures)} more in metrics.csv</p>"
            if data.failed > len(data.failures) else "")
    return (f"<section id=failures><h2>Failures ({data.failed})</h2><table class=failures>"
            f"<tr><th>file</th><th>reason</th></tr>{rows}</table>{more}</section>")


def _dice_table(data: _Collected) -> str:
    if not data.scored:
        return ("<section id=scores><h2>Scores against ground truth</h2>"
                "<p>No image paired with a truth mask.</p></section>")
    scored = sorted(data.scored, key=lambda r: r[1])
    means = [np.mean([r[i] for r in scored if r[i] is not None]) for i in range(1, 7)]
    head = "".join(f"<th>{s}</th>" for s in SCORES)
    mean_row = "".join(f"<td class=num><b>{m:.4f}</b></td>" for m in means)
    body = "".join("<tr><td>" + html.escape(Path(r[0]).name) + "</td>"
                   + "".join(f"<td class=num>{'-' if x is None else f'{x:.4f}'}</td>"
                             for x in r[1:]) + "</tr>" for r in scored[:MAX_LISTED])
    return (f"<section id=scores><h2>Scores against ground truth ({len(scored)} images, "
            f"worst Dice first)</h2><table class=dice><tr><th>image</th>{head}</tr>"
            f"<tr><td><b>mean</b></td>{mean_row}</tr>{body}</table></section>")


_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;
max-width:1180px;padding:0 16px;color:#1d2330;background:#fafbfc}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 10px;border-bottom:1px solid
#dde1e7;padding-bottom:4px}.meta{color:#5b6475;font-size:12.5px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:14px 0}.card{background:#fff;border:1px
solid #dde1e7;border-radius:8px;padding:10px 14px;min-width:140px}.value{font-size:22px;
font-weight:600}.label{color:#5b6475;font-size:12px}
table{border-collapse:collapse;background:#fff;font-size:13px}td,th{border:1px solid #dde1e7;
padding:4px 8px;text-align:left;vertical-align:top}th{background:#f0f2f5}td.num{text-align:right;
font-variant-numeric:tabular-nums}table.failures td:first-child{word-break:break-all}
.plots{display:flex;flex-wrap:wrap;gap:12px;margin-top:12px}.plot{background:#fff;border:1px
solid #dde1e7;border-radius:8px;padding:8px}.plot-title{font-weight:600;font-size:13px}
svg rect{fill:#4f7fbf}svg line.median{stroke:#1d2330;stroke-width:1.5}svg line.limit{stroke:
#d0312d;stroke-width:1.5;stroke-dasharray:4 3}svg text{font-size:10px;fill:#5b6475}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:12px}
figure{margin:0;background:#fff;border:1px solid #dde1e7;border-radius:8px;overflow:hidden}
figure img{display:block;width:100%;height:auto}figcaption{padding:6px 8px;font-size:12px;
word-break:break-all}.missing{height:120px;display:flex;align-items:center;justify-content:
center;color:#5b6475;background:#eef0f3}
"""

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width,initial-scale=1">
<style>{style}</style></head>
<body>
{body}
</body></html>
"""
