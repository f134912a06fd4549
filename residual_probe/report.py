"""The `diagnose` report: one self-contained HTML page and the same content as Markdown.

Input: the JSON sidecars and tidy tables that `grad-norms --ckpt` and `collapse` wrote (nothing is
measured or computed here beyond formatting). The HTML embeds every figure as a base64 PNG
data URI and uses no external resource (no scripts, fonts or style sheets), so it reads offline
and can be mailed as one file; the Markdown links the PNGs beside it, for terminals and pull
requests.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Sequence

CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}div.scroll{overflow-x:auto;max-width:100%}ul.verdicts li{margin:.3em 0}.warn{color:#b00020;font-weight:600}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}code,pre{background:#f6f6f6;padding:.1em .3em}pre{padding:.6em;overflow-x:auto}
.small{color:#666;font-size:.85em}"""


def _num(v, fmt: str = ".4g") -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return "nan" if isinstance(v, float) and not math.isfinite(v) else format(v, fmt)
    return "" if v is None else str(v)


def data_line(data: dict) -> str:
    """What the verdicts rest on: windows, tokens and tokenization of the text actually used."""
    if "tokenization" not in data:
        return f"data: {data.get('tokens', '?')} tokens"
    return (
        f"data: {data['windows']} windows x {data['seq_len']} tokens = {data['tokens']} tokens; "
        f"tokenization: {data['tokenization']}"
    )


WARN_PREFIXES = ("warning:", "partly random model")  # lines the report sets apart


def partly_random(missing: Sequence[str], listed: bool = False) -> str:
    """The warning that verdicts are about a partly random model ("" when no weight is missing):
    the console's prefix of each verdict line, or (`listed`) the report's own line naming the
    first missing weights."""
    if not missing:
        return ""
    if listed:
        return (
            f"partly random model: {len(missing)} weights are missing from the files and were left at "
            f"random initialization ({', '.join(missing[:3])}); every verdict below is about that model"
        )
    return f"partly random model ({len(missing)} weights at random initialization): "


def verdict_lines(grads: dict | None, collapse: dict) -> dict[str, list[str]]:
    """label -> plain-language verdicts with their numbers: warnings first (a model that does not
    predict the text, a partly random model), then the verdicts, then the data they rest on and
    every adjustment made to the request."""
    from .analysis.collapse import massive_sentence
    from .analysis.diagnosis import gradient_by_part
    from .analysis.verdicts import collapse_sentence, stream_name

    out: dict[str, list[str]] = {}
    gmodels = {m["label"]: m for m in (grads or {}).get("models", [])}
    for m in collapse["models"]:
        g = gmodels.get(m["label"])
        lines = []
        missing = m.get("partly_random") or []
        if missing:  # first: it explains everything below, a loss warning included
            lines.append(partly_random(missing, listed=True))
        lines += [f"warning: {w}" for w in (g or {}).get("warnings", [])]
        if g is not None and "skipped" in g:
            lines.append(f"gradients: not measured ({g['skipped']})")
        elif g is not None:
            how = (
                " (gradient of a contrastive loss, unsupervised SimCSE: the model has no loss head)"
                if g.get("loss") == "contrastive"
                else ""
            )
            for v in g["verdicts"]:
                lines.append(f"{v['stack']}{how}: {v['verdict']}")
            if g.get("whole_model"):
                lines.append(f"gradient norm by part: {gradient_by_part(g)}")
        elif grads is not None:
            lines.append("gradients: not measured (no loss head)")
        for s in m["streams"]:
            lines.append(f"{stream_name(s['stack'], s['stream'])}: {collapse_sentence(s)}")
        lines += [massive_sentence(f) for f in m.get("massive_activations", [])]
        lines.append(data_line(m["data"]))
        lines += [f"note: {n}" for n in m.get("notes", []) + m["data"].get("messages", [])]
        out[m["label"]] = lines
    return out


def description_rows(grads: dict | None, collapse: dict) -> list[dict]:
    gmodels = {m["label"]: m for m in (grads or {}).get("models", [])}
    rows = []
    for m in collapse["models"]:
        g = gmodels.get(m["label"], {})
        rows.append(
            {
                "model": m["label"],
                "family": m["family"],
                "placement (detected)": m["placement"],
                "detail": m["placement_detail"],
                "norm type": m.get("norm_type"),
                "qk-norm": {True: "yes", False: "no"}.get(m.get("qk_norm"), "-"),
                "placement reason": m.get("placement_reason") or "-",
                "depth": ", ".join(f"{s} {n}" for s, n in m["depth"].items()),
                "width": m["width"],
                "parameters": f"{m['parameters']:,}",
                "loss": g.get("loss", "-"),
                "mean loss": _num(g.get("mean_loss"), ".4f") if g else "-",
                "tokens": m["data"].get("tokens"),
                "tokenization": m["data"].get("tokenization", m["data"].get("kind")),
            }
        )
    return rows


def per_block_table(
    rows: Sequence[dict], key: str, value: str, filt
) -> tuple[list[str], list[list[str]]]:
    """A layer x series table: header, then one row per layer."""
    series: dict[str, dict[int, float]] = {}
    for r in rows:
        if filt(r):
            series.setdefault(key(r), {})[int(r["layer"])] = float(r[value])
    names = list(series)
    layers = sorted({k for v in series.values() for k in v})
    body = [
        [str(k)] + [_num(series[n][k]) if k in series[n] else "-" for n in names] for k in layers
    ]
    return ["block"] + names, body


def _html_table(header: list[str], body: list[list[str]], left: int = 1) -> str:
    th = "".join(
        f'<th class="{"l" if i < left else ""}">{html.escape(h)}</th>' for i, h in enumerate(header)
    )
    trs = "".join(
        "<tr>"
        + "".join(
            f'<td class="{"l" if i < left else ""}">{html.escape(str(c))}</td>'
            for i, c in enumerate(r)
        )
        + "</tr>"
        for r in body
    )
    return f'<div class="scroll"><table><tr>{th}</tr>{trs}</table></div>'  # wide tables scroll, the page does not


def _md_table(header: list[str], body: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in body]
    return "\n".join(lines)


def write_report(
    out: Path,
    grads: dict | None,
    collapse: dict,
    grad_rows: list[dict],
    collapse_rows: list[dict],
    figures: list[tuple[str, Path]],
    command: str,
    times: dict,
) -> list[Path]:
    """OUT/report.html and OUT/report.md; `figures` are (caption, png path) pairs; returns the paths."""
    from .analysis.precursors import ATTN_LOGIT_LIMIT
    from .analysis.verdicts import thresholds_text
    from .output import write_atomic

    verdicts = verdict_lines(grads, collapse)
    desc = description_rows(grads, collapse)
    desc_header = list(desc[0]) if desc else []
    desc_body = [[str(v) for v in d.values()] for d in desc]
    tables = []
    if grad_rows:
        tables.append(
            (
                "Per-block gradient norm ‖∂L/∂θ_k‖₂ (whole block), per model and stack",
                per_block_table(
                    grad_rows,
                    lambda r: f"{r['model']} {r['stack']}",
                    "param_grad_norm",
                    lambda r: r["sublayer"] == "block",
                ),
            )
        )
    for metric, caption in (
        (
            "cos_adjacent",
            "Adjacent cosine cos(h_{k-1}, h_k) per block (1 = the block changes nothing)",
        ),
        ("relative_update", "Relative update ‖h_k − h_{k-1}‖ / ‖h_{k-1}‖ per block"),
        (
            "attn_logit_max",
            f"Largest attention logit per block (above {ATTN_LOGIT_LIMIT:g}, where Gemma 2 "
            "soft-caps, the training precursor rule warns of attention-logit growth)",
        ),
        (
            "attn_entropy",
            "Mean attention entropy per block, nats (over heads and queries; near 0: one-hot "
            "attention, the entropy collapse of Zhai et al. 2023)",
        ),
    ):
        tables.append(
            (
                caption,
                per_block_table(
                    collapse_rows,
                    lambda r: " ".join(
                        [r["model"], r["stack"]] + ([] if r["stream"] == "-" else [r["stream"]])
                    ),
                    "value",
                    lambda r, m=metric: r["metric"] == m and int(r["layer"]) >= 0,
                ),
            )
        )
    tables = [(caption, table) for caption, table in tables if table[1]]  # a series not recorded
    versions = collapse.get("versions", {})
    labels = ", ".join(m["label"] for m in collapse["models"])

    # ---- HTML ----
    parts = [
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>residual-probe diagnosis: '
        f"{html.escape(labels)}</title><style>{CSS}</style></head><body>",
        f"<h1>residual-probe diagnosis: {html.escape(labels)}</h1>",
        "<h2>Verdicts</h2>",
    ]
    for label, lines in verdicts.items():
        parts.append(f'<h3>{html.escape(label)}</h3><ul class="verdicts">')
        for line in lines:
            cls = ' class="warn"' if line.startswith(WARN_PREFIXES) else ""
            parts.append(f"<li{cls}>{html.escape(line)}</li>")
        parts.append("</ul>")
    parts += ["<h2>Models</h2>", _html_table(desc_header, desc_body, left=len(desc_header))]
    parts.append("<h2>Figures</h2>")
    for caption, png in figures:
        data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
        parts.append(
            f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f'<figcaption class="small">{html.escape(caption)}</figcaption></figure>'
        )
    parts.append("<h2>Numbers</h2>")
    for caption, (header, body) in tables:
        parts += [f"<h3>{html.escape(caption)}</h3>", _html_table(header, body)]
    parts += [
        "<h2>Run</h2>",
        f"<pre>{html.escape(command)}</pre>",
        _html_table(
            ["what", "value"],
            [[k, _num(v, ".1f") + " s"] for k, v in times.items()]
            + [[k, v] for k, v in versions.items()],
            left=1,
        ),
        '<p class="small">Written by residual-probe diagnose. Thresholds: '
        f"{thresholds_text('&ge;')}.</p>",
        "</body></html>",
    ]
    html_path = write_atomic(out / "report.html", "\n".join(parts))

    # ---- Markdown ----
    md = [f"# residual-probe diagnosis: {labels}", "", "## Verdicts", ""]
    for label, lines in verdicts.items():
        md.append(f"**{label}**")
        md.append("")
        md += [
            f"- {'**' + line + '**' if line.startswith(WARN_PREFIXES) else line}" for line in lines
        ]
        md.append("")
    md += ["## Models", "", _md_table(desc_header, desc_body), ""]
    md += ["## Figures", ""]
    md += [
        f"![{caption}]({Path(png).relative_to(out) if Path(png).is_relative_to(out) else png})\n"
        for caption, png in figures
    ]
    md += ["## Numbers", ""]
    for caption, (header, body) in tables:
        md += [f"### {caption}", "", _md_table(header, body), ""]
    md += ["## Run", "", "```", command, "```", ""]
    md += [f"- {k}: {_num(v, '.1f')} s" for k, v in times.items()]
    md += [f"- {k} {v}" for k, v in versions.items()]
    md_path = write_atomic(out / "report.md", "\n".join(md) + "\n")
    return [html_path, md_path]
