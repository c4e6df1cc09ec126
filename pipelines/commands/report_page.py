"""The HTML around `dodo-segment report`'s sections: one page, its style inline, no script.

The Content-Security-Policy lets the page load nothing at all (no font, image, script or
stylesheet from anywhere): the charts are inline SVG and the style is in the page.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       margin: 0; color: #222; background: #f6f7f9; }
header { background: #1f2937; color: #fff; padding: 16px 28px; }
header h1 { margin: 0 0 4px; font-size: 22px; }
header p { margin: 0; color: #d1d5db; font-size: 14px; }
nav { padding: 8px 28px; background: #e5e7eb; font-size: 14px; }
nav a { margin-right: 18px; color: #1f2937; }
main { max-width: 1120px; margin: 0 auto; padding: 8px 28px 40px; }
section { background: #fff; border-radius: 8px; padding: 12px 22px 18px; margin: 18px 0;
          box-shadow: 0 1px 2px rgba(0,0,0,.08); }
h2 { font-size: 19px; margin: 8px 0 12px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
.banner { background: #fdecea; border: 3px solid #c0392b; padding: 10px 14px; margin: 14px 0 0;
          font-size: 15px; }
.headlines { display: flex; flex-wrap: wrap; gap: 12px; margin: 6px 0 10px; }
.headline { background: #f3f4f6; border-radius: 6px; padding: 8px 14px; min-width: 150px; }
.headline .label { display: block; font-size: 12px; color: #555; }
.headline .value { display: block; font-size: 22px; font-weight: 600; }
figure.chart { margin: 8px 0; }
figure.chart svg { max-width: 100%; height: auto; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0; }
th, td { padding: 3px 10px; border-bottom: 1px solid #e5e7eb; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.empty { color: #6b7280; font-style: italic; }
.note { color: #555; font-size: 13px; }
"""


def page(banner: str, as_of: str, source: str, generated: str, nav: str, body: str) -> str:
    """The whole page; every argument is HTML already escaped by the caller."""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>dodo-segment report</title>
<style>{STYLE}</style>
</head>
<body>
<header><h1>dodo-segment report</h1>
<p>Data as of <b id="as-of">{as_of}</b> (the warehouse's as-of time) &middot; {source}
&middot; generated {generated}</p></header>
<nav>{nav}</nav>
<main>{banner}{body}</main>
</body>
</html>
"""


def headline(key: str, label: str, value: str) -> str:
    """One headline figure; `data-figure` names it for the browser test."""
    return (
        f'<div class="headline" data-figure="{html.escape(key)}"><span class="label">'
        f'{html.escape(label)}</span><span class="value">{html.escape(value)}</span></div>'
    )


def section(anchor: str, title: str, content: str) -> str:
    """One section with its heading."""
    return f'<section id="{html.escape(anchor)}"><h2>{html.escape(title)}</h2>{content}</section>'


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain table; every cell escaped."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    try:
        import pandas as pd

        if pd.isna(value):
            return "-"
    except (TypeError, ValueError):
        pass
    return str(value)
