"""The evaluation report: ONE self-contained HTML page, `eval/report.html`.

    write_report(eval_dir, summary=summary, rows=rows, lesion_rows=lesions, run_dir=run_dir)

Opens from the file system with no network: CSS and JavaScript are inline, no CDN, no web
font, and a Content-Security-Policy forbids any other origin; pictures are referenced by
relative path beside the page (`overlays/<case_id>.png`, the agreement plots, the run's
`curves.png`), so moving the run directory keeps it whole. Sections: cohort summary (means,
95 % CIs, counts, lesion detection), a per-study table sortable by any column with an
overlay thumbnail and a link to the predicted mask, PET quantification agreement (table +
plots), the per-lesion table, the settings and the training curves.

Speed (1,000 studies, tested in headless Chromium): the table rows live in one inline JSON
array (every `<` escaped as \\u003c, so no `</script>` can end it early) and are built once
by JavaScript; a header click sorts a precomputed key array per column (numbers as numbers,
text in natural order, NaN / empty always last) and moves the existing rows into place with
one DocumentFragment. One click listener per table (on its header), none per row.
Every string from the data (case ids are folder names) is HTML-escaped in Python or set as
text (textContent) in JavaScript. Imports numpy and quantification (file names, labels) only.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence
from urllib.parse import quote

import numpy as np

from quantification import AGREEMENT_LABELS, BLAND_ALTMAN_PNG, SCATTER_PNG

OBJECTIVE_LABELS = {"pooled_dice": "pooled Dice of their voxels",  # config pp_objective
                    "mean_dice": "mean Dice of their tumour studies",
                    "mean_dice_fpv": "mean Dice of their tumour studies with a mean "
                                     "false-positive volume"}  # + the limit: _objective_label

# the files of quantification.save_agreement_plots, shown when present in eval_dir
AGREEMENT_PLOTS = ((BLAND_ALTMAN_PNG, "Bland–Altman: difference against the mean"),
                   (SCATTER_PNG, "Predicted against reference, identity line"))
THUMB_HEIGHT = 72  # px, overlay thumbnails in the per-study table

# summary["metrics"] keys of test.summarise_cohort -> label; unknown keys are shown as they are
METRIC_LABELS = {
    "dice": "Dice (tumour studies)", "iou": "IoU (tumour studies)",
    "fpv_ml_tumor_free": "FPV ml (tumour-free studies)", "fpv_ml_tumor": "FPV ml (tumour studies)",
    "fpv_ml": "FPV ml (all studies)", "fnv_ml": "FNV ml (tumour studies)",
    "hd95_mm": "HD95 mm", "assd_mm": "ASSD mm", "sensitivity": "sensitivity (voxels)",
    "precision": "precision (voxels)"}
COUNT_LABELS = (("n_studies", "studies"), ("n_tumor", "with tumour"),
                ("n_tumor_free", "tumour-free"),
                ("n_tumor_free_with_fp", "tumour-free with a false positive"),
                ("n_tumor_missed", "tumour studies with no lesion found"))
LESION_LABELS = (("n_lesions", "lesions (ground truth)"), ("detected", "detected"),
                 ("false_positive_components", "false-positive components"),
                 ("recall", "recall"), ("precision", "precision"), ("f1", "F1"))


# ---------------------------------------------------------------------------------------------
# values


def _esc(value: Any) -> str:
    """HTML-escaped text of any value (quotes too: safe in attributes)."""
    return html.escape(str(value), quote=True)


def _plain(value: Any) -> Any:
    """numpy scalars -> Python; NaN / inf / "" -> None (missing); others unchanged."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str) and value == "":
        return None
    return value


def _number(value: Any, digits: int = 3) -> str:
    """A number for a static table: `digits` decimals (integers as they are), NaN as 'NaN'."""
    value = _plain(value)
    if value is None:
        return "NaN"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        small = abs(value) < 10 ** -digits and value != 0
        return f"{value:.2e}" if small else f"{value:.{digits}f}"
    return str(value)


def _column_type(values: Iterable[Any]) -> str:
    """'bool' (every present value a bool), 'num' (int / float), else 'str'."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return "bool"
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return "num"
    return "str"


def _from_text(values: list[Any]) -> Optional[list[Any]]:
    """A column of CSV text as numbers (NaN -> None) or bools, when every present value is
    text of that kind; None to keep the column as it is. (case_id is never converted.)"""
    text = [v for v in values if v is not None]
    if not text or not all(isinstance(v, str) for v in text):
        return None
    if all(v in ("True", "False") for v in text):
        return [None if v is None else v == "True" for v in values]
    try:
        numbers = [None if v is None else float(v) for v in values]
    except ValueError:
        return None
    return [None if v is None or not math.isfinite(v) else v for v in numbers]


def _cell_value(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "num":
        return float(value)
    if kind == "bool":
        return bool(value)
    return str(value)


def _png_size(path: Path) -> Optional[tuple[int, int]]:
    """(width, height) from a PNG's IHDR chunk (24 bytes read), None if it is not a PNG."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError:
        return None
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _url(*parts: str) -> str:
    """A relative URL from path parts (each percent-encoded: case ids may hold spaces, #, ?)."""
    return "/".join(quote(part, safe="") for part in parts)


# ---------------------------------------------------------------------------------------------
# tables built by JavaScript: {"columns": [{"key", "label", "type"}], "rows": [[...], ...]}


def _table_spec(rows: Sequence[Mapping[str, Any]], first: Sequence[str] = ("case_id",),
                ) -> dict[str, Any]:
    keys = list(dict.fromkeys([*(k for k in first if any(k in r for r in rows)),
                               *(k for r in rows for k in r)]))
    plain = [[_plain(row.get(k)) for k in keys] for row in rows]
    for j, key in enumerate(keys):  # rows read back from a CSV hold text: "0.81", "nan", "True"
        if key != "case_id":
            column = _from_text([r[j] for r in plain])
            if column is not None:
                for r, v in zip(plain, column):
                    r[j] = v
    types = [_column_type(r[j] for r in plain) for j in range(len(keys))]
    return {"columns": [{"key": k, "label": k, "type": t} for k, t in zip(keys, types)],
            "rows": [[_cell_value(v, t) for v, t in zip(r, types)] for r in plain]}


def _study_table(eval_dir: Path, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-study table: case_id, overlay thumbnail (img), predicted mask (link), the rest."""
    spec = _table_spec(rows)
    overlays, masks = [], []
    for row in rows:
        case = str(row.get("case_id", ""))
        size = _png_size(eval_dir / "overlays" / f"{case}.png") if case else None
        overlays.append([_url("overlays", f"{case}.png"), *size] if size else None)
        mask = eval_dir / "predictions" / f"{case}.nii.gz"
        masks.append(_url("predictions", f"{case}.nii.gz") if case and mask.is_file() else None)
    at = 1 if spec["columns"] and spec["columns"][0]["key"] == "case_id" else 0
    spec["columns"][at:at] = [{"key": "overlay", "label": "overlay", "type": "img"},
                              {"key": "mask", "label": "mask", "type": "link"}]
    for r, overlay, mask in zip(spec["rows"], overlays, masks):
        r[at:at] = [overlay, mask]
    return spec


def _text_length(value: Any, kind: str) -> int:
    """Characters of a cell as the page's JavaScript `fmt` writes it (for the column width)."""
    if value is None:
        return 3  # "NaN"
    if kind == "num":
        v = float(value)
        if v.is_integer() and abs(v) < 1e15:
            return len(str(int(v)))
        a = abs(v)
        return len(f"{v:.1f}" if a >= 1000 else f"{v:.3f}" if a >= 0.01 else f"{v:.2e}")
    if kind == "bool":
        return 3
    if kind == "link":
        return 5
    return len(str(value))


def _column_widths(spec: dict[str, Any]) -> list[int]:
    """Pixel width per column: the longest cell (~7 px a character at 12.5 px, + padding),
    at least a wrapped header, at most 340 px; thumbnails as wide as the widest one."""
    widths = []
    for j, col in enumerate(spec["columns"]):
        cells = [row[j] for row in spec["rows"]]
        if col["type"] == "img":
            shown = [round(c[1] * THUMB_HEIGHT / max(c[2], 1)) for c in cells if c]
            widths.append(min(max(shown, default=40) + 16, 420))
            continue
        longest = max((_text_length(c, col["type"]) for c in cells), default=3)
        # a label may wrap after an underscore (_label_html): its longest piece must fit
        header = max(len(piece) + 1 for piece in str(col["label"]).split("_"))
        widths.append(int(min(max(longest * 7.2 + 18, header * 7.8 + 26, 44), 340)))
    return widths


def _table_shell(table_id: str, spec: dict[str, Any], caption: str) -> tuple[str, str]:
    """(<table> with its sortable header (buttons) and an empty body JavaScript fills,
    the table's CSS: one grid template, so every row shares the column widths).

    Rows are CSS grids of fixed column widths with `content-visibility: auto`: the browser
    lays out and paints only the rows near the screen, so sorting 1,000 rows costs tens of
    milliseconds instead of seconds of table layout (measured)."""
    heads = []
    for j, col in enumerate(spec["columns"]):
        label = _esc(col["label"]).replace("_", "_<wbr>")  # wrap fpv_ml after the underscore
        if col["type"] in ("img", "link"):
            heads.append(f'<th scope="col" class="nosort">{label}</th>')
        else:
            align = ' class="right"' if col["type"] == "num" else ""
            heads.append(f'<th scope="col"{align} data-key="{_esc(col["key"])}" '
                         f'aria-sort="none"><button type="button" data-col="{j}" '
                         f'title="sort by {_esc(col["label"])}">{label}</button></th>')
    template = " ".join(f"{w}px" for w in _column_widths(spec))
    row_height = THUMB_HEIGHT + 7 if any(c["type"] == "img" for c in spec["columns"]) else 25
    css = (f"#{table_id} tr{{grid-template-columns:{template}}}"
           f"#{table_id} tbody tr{{contain-intrinsic-size:auto {row_height}px}}")
    shell = (f'<p class="hint">{_esc(caption)}</p>'
             f'<div class="scroll"><table id="{_esc(table_id)}" class="data">'
             f'<thead><tr>{"".join(heads)}</tr></thead><tbody></tbody></table></div>'
             f'<noscript><p class="warn">The table needs JavaScript; the same numbers are in '
             f'the CSV files beside this page.</p></noscript>')
    return shell, css


def _json_for_script(payload: Any) -> str:
    """JSON safe inside <script>: every <, > and & as a \\u escape (only strings hold them),
    so a value like '</script>' cannot end the element; NaN is not JSON (None instead)."""
    text = json.dumps(payload, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


# ---------------------------------------------------------------------------------------------
# static sections


def _kv_table(pairs: Iterable[tuple[str, str]], head: tuple[str, str] = ("", "")) -> str:
    body = "".join(f"<tr><th scope=\"row\">{_esc(k)}</th><td>{_esc(v)}</td></tr>"
                   for k, v in pairs)
    thead = f"<thead><tr><th>{_esc(head[0])}</th><th>{_esc(head[1])}</th></tr></thead>" \
        if any(head) else ""
    return f'<table class="kv">{thead}<tbody>{body}</tbody></table>'


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested settings -> [("postprocess.suv_floor", "0.0"), ...]; lists as JSON text."""
    if isinstance(value, Mapping):
        out: list[tuple[str, str]] = []
        for k, v in value.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(value, (list, tuple)):
        text = json.dumps([_plain(v) for v in value], default=str)
    else:
        v = _plain(value)
        text = "NaN" if v is None and value is not None else ("" if v is None else str(v))
    return [(prefix, text)]


def _metrics_section(summary: Mapping[str, Any], heading: str) -> str:
    metrics = summary.get("metrics") or {}
    lines = []
    for key, entry in metrics.items():
        entry = entry if isinstance(entry, Mapping) else {"mean": entry}
        ci = entry.get("ci95")
        ci_text = (f"[{_number(ci[0])}, {_number(ci[1])}]"
                   if isinstance(ci, (list, tuple)) and len(ci) == 2 else "")
        lines.append(f"<tr><th scope=\"row\">{_esc(METRIC_LABELS.get(key, key))}</th>"
                     f"<td class=\"num\">{_esc(_number(entry.get('mean')))}</td>"
                     f"<td class=\"num\">{_esc(ci_text)}</td>"
                     f"<td class=\"num\">{_esc(_number(entry.get('n')))}</td></tr>")
    if not lines:
        return f"<h3>{_esc(heading)}</h3><p class=\"hint\">no metrics in the summary</p>"
    return (f"<h3>{_esc(heading)}</h3><table class=\"kv metrics\"><thead><tr><th>metric</th>"
            f"<th>mean</th><th>95 % CI</th><th>studies</th></tr></thead>"
            f"<tbody>{''.join(lines)}</tbody></table>")


def _summary_section(summary: Mapping[str, Any]) -> str:
    cards = "".join(f'<div class="card"><div class="big">{_esc(_number(summary[k]))}</div>'
                    f'<div>{_esc(label)}</div></div>'
                    for k, label in COUNT_LABELS if k in summary)
    columns = [_metrics_section(summary, "Segmentation (per 3-D study)")]
    lesions = summary.get("lesions")
    if isinstance(lesions, Mapping):
        pairs = [(label, _number(lesions[k])) for k, label in LESION_LABELS if k in lesions]
        pairs += [(k, _number(v)) for k, v in lesions.items()
                  if k not in dict(LESION_LABELS)]
        columns.append("<h3>Lesion detection (counts pooled over studies)</h3>"
                       + _kv_table(pairs))
    post = summary.get("postprocessed")
    if isinstance(post, Mapping):
        columns.append(_metrics_section(post, "After post-processing"))
    parts = [f'<div class="cards">{cards}</div>' if cards else "",
             '<div class="columns">' + "".join(f"<div>{c}</div>" for c in columns) + "</div>"]
    boot = summary.get("bootstrap")
    if isinstance(boot, Mapping):
        parts.append(f'<p class="hint">95 % CI: {_esc(boot.get("method", "percentile"))} '
                     f'bootstrap over studies, {_esc(boot.get("n_bootstrap", "?"))} resamples, '
                     f'seed {_esc(boot.get("seed", "?"))}. NaN: not defined for any study '
                     f'(docs/evaluation.md, empty-case policy).</p>')
    tuning = summary.get("threshold_tuning")
    if isinstance(tuning, Mapping) and "chosen" in tuning:
        parts.append(f'<p class="hint">Probability threshold {_esc(tuning["chosen"])} chosen on '
                     f'{_esc(tuning.get("n_val_studies", "?"))} validation studies'
                     + (f' (the highest {_esc(_objective_label(tuning))})'
                        if "objective" in tuning else "") + '.</p>')
    return "".join(parts)


def _objective_label(tuning: Mapping[str, Any]) -> str:
    """What the threshold tuning maximised, in words (with mean_dice_fpv's limit, and whether
    any setting met it)."""
    label = OBJECTIVE_LABELS.get(tuning["objective"], str(tuning["objective"]))
    if tuning["objective"] != "mean_dice_fpv":
        return label
    limit = tuning.get("max_fpv_ml")
    label += (f" of at most {limit:g} ml" if isinstance(limit, (int, float)) else " within a limit")
    label += " on their tumour-free studies"
    if tuning.get("limit_met") is False:
        label += "; no setting met that limit, so the one with the lowest volume"
    return label


def _agreement_section(summary: Mapping[str, Any], eval_dir: Path) -> str:
    agreement = summary.get("agreement")
    parts = []
    if isinstance(agreement, Mapping) and agreement:
        lines = []
        for key, st in agreement.items():
            if not isinstance(st, Mapping):
                continue
            loa = f"[{_number(st.get('loa_low'))}, {_number(st.get('loa_high'))}]"
            lines.append(
                f"<tr><th scope=\"row\">{_esc(AGREEMENT_LABELS.get(key, key))}</th>"
                + "".join(f"<td class=\"num\">{_esc(text)}</td>" for text in (
                    _number(st.get("n")), _number(st.get("n_dropped")), _number(st.get("bias")),
                    _number(st.get("sd_diff")), loa, _number(st.get("icc_2_1")),
                    _number(st.get("spearman"))))
                + "</tr>")
        parts.append("<table class=\"kv metrics\"><thead><tr><th>quantity</th><th>pairs</th>"
                     "<th>dropped (NaN)</th><th>bias (pred − ref)</th><th>SD of differences</th>"
                     "<th>95 % limits of agreement</th><th>ICC(2,1)</th><th>Spearman ρ</th>"
                     f"</tr></thead><tbody>{''.join(lines)}</tbody></table>"
                     "<p class=\"hint\">Tumour studies only; a pair with a NaN (e.g. the SUVmax "
                     "of an empty prediction) is dropped. Limits of agreement: bias ± 1.96 SD "
                     "(Bland &amp; Altman 1986); ICC(2,1): two-way random effects, absolute "
                     "agreement, single measurement (Shrout &amp; Fleiss 1979).</p>")
    else:
        parts.append("<p class=\"hint\">No agreement in the summary "
                     "(quantification.cohort_agreement puts it under summary[\"agreement\"]).</p>")
    for name, caption in AGREEMENT_PLOTS:
        size = _png_size(eval_dir / name)
        if size:
            parts.append(f'<figure><a href="{_esc(_url(name))}"><img class="plot" '
                         f'src="{_esc(_url(name))}" width="{size[0]}" height="{size[1]}" '
                         f'alt="{_esc(caption)}"></a><figcaption>{_esc(caption)}</figcaption>'
                         f'</figure>')
    return "".join(parts)


def _curves(eval_dir: Path, run_dir: Optional[Path]) -> Optional[tuple[str, tuple[int, int]]]:
    """Relative URL and size of the run's curves.png (run_dir, else eval_dir's parent); copied
    beside the page when no relative path exists (another drive)."""
    candidates = [run_dir / "curves.png"] if run_dir is not None else []
    candidates.append(eval_dir.parent / "curves.png")
    for path in candidates:
        size = _png_size(path)
        if not size:
            continue
        try:
            rel = os.path.relpath(path.resolve(), eval_dir.resolve())
        except ValueError:
            shutil.copyfile(path, eval_dir / "curves.png")
            rel = "curves.png"
        return "/".join(quote(p, safe="") if p != ".." else p for p in Path(rel).parts), size
    return None


# ---------------------------------------------------------------------------------------------
# the page

CSS = """
:root{--fg:#1d2733;--muted:#5b6675;--line:#d9dee5;--head:#f3f5f8;--accent:#1f5f99;--bg:#fff}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:var(--fg);background:var(--bg)}
header{background:#16324f;color:#fff;padding:18px 28px}
header h1{margin:0;font-size:21px;font-weight:600}
header p{margin:4px 0 0;color:#c9d6e3;font-size:13px}
nav{position:sticky;top:0;z-index:3;background:#fff;border-bottom:1px solid var(--line);padding:6px 28px}
nav a{color:var(--accent);text-decoration:none;margin-right:18px;font-size:13px}
nav a:hover{text-decoration:underline}
main{padding:8px 28px 40px;max-width:1500px}
section{margin-top:18px}
h2{font-size:17px;margin:18px 0 8px;padding-bottom:4px;border-bottom:2px solid var(--line)}
h3{font-size:14px;margin:14px 0 6px}
.columns{display:flex;flex-wrap:wrap;gap:8px 48px;align-items:flex-start}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:8px 0}
.card{border:1px solid var(--line);border-radius:6px;padding:8px 14px;min-width:130px;background:var(--head);font-size:12px;color:var(--muted)}
.card .big{font-size:22px;font-weight:600;color:var(--fg)}
table{border-collapse:collapse}
table.kv th,table.kv td{border-bottom:1px solid var(--line);padding:4px 12px 4px 0;text-align:left;vertical-align:top}
table.kv thead th{color:var(--muted);font-weight:600;font-size:12px}
table.kv tbody th{font-weight:500}
table.kv td.num{text-align:right;padding-left:14px}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.hint{color:var(--muted);font-size:12px;margin:4px 0 8px}
.warn{color:#a33}
.scroll{overflow:auto;max-height:78vh;border:1px solid var(--line);border-radius:4px}
table.data{display:block;width:max-content;font-size:12.5px}
table.data thead{display:block;position:sticky;top:0;z-index:2}
table.data tbody{display:block}
table.data tr{display:grid}
table.data tbody tr{content-visibility:auto;background:#fff;border-bottom:1px solid #eef0f3}
table.data tbody tr:hover{background:#eef4fb}
table.data th,table.data td{display:flex;align-items:center;min-width:0;overflow:hidden}
table.data th{background:var(--head);border-bottom:1px solid var(--line);padding:0;font-weight:600;text-align:left}
table.data th.nosort{padding:6px 8px}
table.data th button{all:unset;box-sizing:border-box;flex:1;align-self:stretch;padding:6px 16px 6px 8px;cursor:pointer;position:relative;display:flex;align-items:center}
table.data th.right button{justify-content:flex-end;text-align:right}
table.data th button:focus-visible{outline:2px solid var(--accent);outline-offset:-2px}
table.data th button::after{content:"";position:absolute;right:5px;color:var(--accent);font-size:10px}
table.data th[aria-sort=ascending] button::after{content:"\\25B2"}
table.data th[aria-sort=descending] button::after{content:"\\25BC"}
table.data th[aria-sort=ascending],table.data th[aria-sort=descending]{background:#e3ebf4}
table.data td{padding:3px 8px;white-space:nowrap}
table.data td.n{justify-content:flex-end;font-variant-numeric:tabular-nums}
table.data tr>:first-child{position:sticky;left:0;z-index:1;background:inherit;border-right:1px solid var(--line)}
table.data thead tr>:first-child{background:var(--head)}
table.data tbody td:first-child{font-weight:500}
td.na{color:#9aa3ad}
td.yes{color:#1e7b34}td.no{color:#8a5a00}
table.data td.thumb{padding:2px 6px}
td.thumb img{display:block;height:__THUMB__px;width:auto;border:1px solid var(--line);background:#fff}
a{color:var(--accent)}
figure{display:inline-block;margin:8px 16px 8px 0;vertical-align:top}
figure img.plot,img.curves{max-width:100%;height:auto;border:1px solid var(--line)}
figcaption{color:var(--muted);font-size:12px}
footer{color:var(--muted);font-size:12px;padding:10px 28px 24px;border-top:1px solid var(--line)}
"""

SCRIPT = r"""
(function () {
  "use strict";
  var t0 = performance.now();
  var timings = window.reportTimings = {script_start_ms: t0, render_ms: null, sort_ms: []};
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var THUMB = __THUMB__;  // THUMB_HEIGHT

  function fmt(v) {
    if (Number.isInteger(v)) return String(v);
    var a = Math.abs(v);
    if (a >= 1000) return v.toFixed(1);
    if (a >= 0.01) return v.toFixed(3);
    return v.toPrecision(3);
  }

  function cell(type, v) {
    var td = document.createElement("td");
    if (v === null || v === undefined) {
      if (type === "num") { td.className = "na n"; td.textContent = "NaN"; td.title = "not defined"; }
      return td;
    }
    if (type === "num") { td.className = "n"; td.textContent = fmt(v); }
    else if (type === "bool") { td.className = v ? "yes" : "no"; td.textContent = v ? "yes" : "no"; }
    else if (type === "img") {
      td.className = "thumb";
      var a = document.createElement("a"), img = document.createElement("img");
      a.href = v[0]; a.target = "_blank"; a.rel = "noopener";
      img.loading = "lazy"; img.decoding = "async"; img.src = v[0]; img.alt = "overlay";
      img.height = THUMB; img.width = Math.round(v[1] * THUMB / Math.max(v[2], 1));
      a.appendChild(img); td.appendChild(a);
    } else if (type === "link") {
      var l = document.createElement("a"); l.href = v; l.textContent = "NIfTI"; td.appendChild(l);
    } else { td.textContent = v; td.title = v; }
    return td;
  }

  function buildKey(spec, j) {
    var rows = spec.rows, n = rows.length, key = new Float64Array(n), type = spec.columns[j].type;
    if (type === "num" || type === "bool") {
      for (var i = 0; i < n; i++) { var v = rows[i][j]; key[i] = v === null ? NaN : +v; }
      return key;
    }
    // text: rank in natural order ("case_2" before "case_10"), empty last (NaN)
    var idx = [], collator = new Intl.Collator(undefined, {numeric: true, sensitivity: "base"});
    for (var k = 0; k < n; k++) { key[k] = NaN; if (rows[k][j] !== null) idx.push(k); }
    idx.sort(function (a, b) { return collator.compare(rows[a][j], rows[b][j]) || a - b; });
    for (var r = 0; r < idx.length; r++) key[idx[r]] = r;
    return key;
  }

  function setup(id, spec) {
    var table = document.getElementById(id);
    if (!table) return;
    var thead = table.tHead, tbody = table.tBodies[0], cols = spec.columns, rows = spec.rows;
    var types = cols.map(function (c) { return c.type; });
    var trs = new Array(rows.length), frag = document.createDocumentFragment();
    for (var i = 0; i < rows.length; i++) {
      var tr = document.createElement("tr"), row = rows[i];
      for (var j = 0; j < types.length; j++) tr.appendChild(cell(types[j], row[j]));
      trs[i] = tr; frag.appendChild(tr);
    }
    tbody.appendChild(frag);
    var keys = [], current = -1, ascending = true;
    thead.addEventListener("click", function (event) {
      var button = event.target.closest("button[data-col]");
      if (!button) return;
      var col = +button.getAttribute("data-col");
      ascending = col === current ? !ascending : true;
      current = col;
      var s = performance.now();
      var key = keys[col] || (keys[col] = buildKey(spec, col));
      var dir = ascending ? 1 : -1, order = new Array(rows.length);
      for (var k = 0; k < order.length; k++) order[k] = k;
      order.sort(function (a, b) {
        var x = key[a], y = key[b], nx = x !== x, ny = y !== y;
        if (nx || ny) return nx === ny ? a - b : (nx ? 1 : -1);  // NaN / empty always last
        return x < y ? -dir : (x > y ? dir : a - b);
      });
      // empty the body in one step first: moving rows one by one out of a live tbody makes
      // the browser re-check the position of every later row each time (quadratic)
      tbody.textContent = "";
      var f = document.createDocumentFragment();
      for (var m = 0; m < order.length; m++) f.appendChild(trs[order[m]]);
      tbody.appendChild(f);
      var ths = thead.querySelectorAll("th[data-key]");
      for (var t = 0; t < ths.length; t++) ths[t].setAttribute("aria-sort", "none");
      button.parentNode.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      timings.sort_ms.push(performance.now() - s);
    });
  }

  Object.keys(data.tables).forEach(function (id) { setup(id, data.tables[id]); });
  timings.render_ms = performance.now() - t0;
})();
"""


def _thumb(text: str) -> str:
    return text.replace("__THUMB__", str(int(THUMB_HEIGHT)))


CSP = ("default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; "
       "script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'")


def write_report(eval_dir: str | os.PathLike, *, summary: Mapping[str, Any],
                 rows: Sequence[Mapping[str, Any]],
                 lesion_rows: Optional[Sequence[Mapping[str, Any]]] = None,
                 run_dir: Optional[str | os.PathLike] = None,
                 settings: Optional[Mapping[str, Any]] = None,
                 title: str = "Evaluation report") -> Path:
    """Write `eval_dir/report.html` (atomically: temporary file + os.replace) and return its path.

    summary: a test.summarise_cohort result (`metrics`, `lesions`, counts, `bootstrap`; and
      optionally `agreement` from quantification.cohort_agreement, `postprocessed`,
      `threshold_tuning`, `settings`); whatever is present is shown, missing keys are skipped.
    rows: per-study dicts (per_case.csv rows: `case_id` first, any other keys), one table row
      each; `overlays/<case_id>.png` and `predictions/<case_id>.nii.gz` under eval_dir are
      linked when they exist.
    lesion_rows: quantification.lesion_table rows of all studies (optional table).
    run_dir: where the run's curves.png is (default: eval_dir's parent, the run layout).
    settings: shown as a table (default summary["settings"]).
    """
    eval_dir = Path(eval_dir)
    if not isinstance(summary, Mapping):
        raise TypeError(f"write_report(summary=...) must be the dict of test.summarise_cohort "
                        f"(summary.json), got {type(summary).__name__}")
    eval_dir.mkdir(parents=True, exist_ok=True)
    rows = [dict(r) for r in rows]
    tables = {"studies": _study_table(eval_dir, rows)}
    if lesion_rows:
        tables["lesions"] = _table_spec([dict(r) for r in lesion_rows], ("case_id", "lesion_id"))
    settings = settings if settings is not None else summary.get("settings")
    curves = _curves(eval_dir, Path(run_dir) if run_dir is not None else None)

    n = len(rows)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    nav = [("summary", "Summary"), ("studies", f"Studies ({n:,})"),
           ("agreement", "PET quantification")]
    if "lesions" in tables:
        nav.append(("lesions", f"Lesions ({len(lesion_rows):,})"))
    nav += [("settings", "Settings"), ("training", "Training curves")]
    study_table, table_css = _table_shell(
        "table-studies", tables["studies"],
        f"{n:,} studies. Click a column header to sort (again: descending); NaN and empty "
        f"cells always sort last. Thumbnail: PET MIP and axial slices, ground truth green, "
        f"prediction red; click to enlarge.")
    sections = [
        f'<section id="summary"><h2>Cohort summary</h2>{_summary_section(summary)}</section>',
        f'<section id="studies"><h2>Studies</h2>{study_table}</section>',
        f'<section id="agreement"><h2>PET quantification: prediction against reference</h2>'
        f'{_agreement_section(summary, eval_dir)}</section>']
    if "lesions" in tables:
        lesion_table, css = _table_shell(
            "table-lesions", tables["lesions"],
            f"{len(lesion_rows):,} 18-connected ground-truth lesions; SUVpeak: 1 ml sphere "
            f"centred in the lesion (PERCIST).")
        table_css += css
        sections.append(f'<section id="lesions"><h2>Reference lesions</h2>{lesion_table}'
                        f'</section>')
    sections.append('<section id="settings"><h2>Settings</h2>'
                    + (_kv_table(_flatten(settings), ("setting", "value")) if settings
                       else '<p class="hint">no settings given</p>') + "</section>")
    sections.append('<section id="training"><h2>Training curves</h2>'
                    + (f'<img class="curves" src="{_esc(curves[0])}" width="{curves[1][0]}" '
                       f'height="{curves[1][1]}" alt="training loss and validation Dice">'
                       if curves else '<p class="hint">no curves.png found for this run</p>')
                    + "</section>")
    payload = {"tables": {f"table-{k}": v for k, v in tables.items()}}
    page = "".join([
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f'<meta http-equiv="Content-Security-Policy" content="{_esc(CSP)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title><style>{_thumb(CSS)}{table_css}</style></head><body>",
        f"<header><h1>{_esc(title)}</h1><p>{n:,} studies"
        + (f" · run {_esc(Path(run_dir).name)}" if run_dir is not None else "")
        + f" · generated {_esc(stamp)}</p></header>",
        "<nav>" + "".join(f'<a href="#{k}">{_esc(v)}</a>' for k, v in nav) + "</nav><main>",
        *sections,
        "</main><footer>Definitions: docs/evaluation.md of the repository (per-study metrics, "
        "empty-case policy, PET quantification). Files beside this page: per_case.csv, "
        "summary.json, predictions/, overlays/.</footer>",
        f'<script type="application/json" id="report-data">{_json_for_script(payload)}</script>',
        f"<script>{_thumb(SCRIPT)}</script></body></html>\n"])
    path = eval_dir / "report.html"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path
