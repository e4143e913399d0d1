"""One self-contained HTML page: tables rendered by pandas, charts and scripts inlined."""

from __future__ import annotations

import html

import pandas as pd

_STYLE = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1em; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; max-width: 100%; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; overflow-wrap: break-word; }
th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.note { color: #a33; }
.caption { color: #555; font-size: 0.9em; }
nav a { margin-right: 1em; display: inline-block; }
.chart { width: 100%; }
.constants { color: #555; font-size: 0.9em; }
table.config td { border: none; padding: 2px 14px 2px 0; }
table.config td.key { color: #666; }
dl.marks { display: grid; grid-template-columns: max-content auto; gap: 3px 12px; font-size: 0.9em; }
dl.marks dt { font-weight: bold; }
dl.marks dd { margin: 0; }
"""


def table_html(frame: pd.DataFrame) -> str:
    """A DataFrame as an HTML table (cells escaped, NaN as ``n/a``)."""
    if frame.empty:
        return '<p class="note">(empty)</p>'
    return f'<div class="wide">{frame.to_html(index=False, escape=True, na_rep="n/a", border=0)}</div>'


def split_tables(frame: pd.DataFrame, keep: list[str], per_table: int = 5) -> str:
    """A wide table as several tables of at most ``per_table`` columns each, every one led by the ``keep`` columns
    (so that a page 1400 px wide never scrolls sideways)."""
    rest = [c for c in frame.columns if c not in keep]
    if len(rest) <= per_table:
        return table_html(frame)
    return "".join(table_html(frame[keep + rest[i : i + per_table]]) for i in range(0, len(rest), per_table))


def settings_html(settings: dict[str, str], columns: int = 3) -> str:
    """``label: value`` pairs as a borderless table, ``columns`` pairs to a row (class ``config``)."""
    items = list(settings.items())
    rows = []
    for start in range(0, len(items), columns):
        cells = "".join(
            f'<td class="key">{html.escape(k)}</td><td>{html.escape(v)}</td>' for k, v in items[start : start + columns]
        )
        rows.append(f"<tr>{cells}</tr>")
    return f'<table class="config">{"".join(rows)}</table>'


def marks_html(marks: list[tuple[str, str]]) -> str:
    """What each mark of a page means, as a definition list (class ``marks``)."""
    items = "".join(f"<dt>{html.escape(mark)}</dt><dd>{html.escape(text)}</dd>" for mark, text in marks)
    return f'<dl class="marks">{items}</dl>'


def paragraph(text: str, css_class: str | None = None) -> str:
    """Escaped text in a ``<p>``."""
    attribute = f' class="{css_class}"' if css_class else ""
    return f"<p{attribute}>{html.escape(text)}</p>"


def write_page(path: str, title: str, sections: list[tuple[str, str]], head: str = "", contents: bool = False) -> str:
    """Write the page: a title, then ``(heading, HTML body)`` sections. Returns ``path``.

    Args:
        path: the file to write.
        title: page title and first heading.
        sections: ``(heading, HTML body)``, in order.
        head: extra HTML for ``<head>`` (an inlined script).
        contents: put a line of links to the sections under the title.
    """
    anchors = [f"s{index}" for index in range(len(sections))]
    body = "\n".join(
        f"<h2 id='{anchor}'>{html.escape(heading)}</h2>\n{content}"
        for anchor, (heading, content) in zip(anchors, sections, strict=True)
    )
    if contents:
        links = " ".join(
            f"<a href='#{anchor}'>{html.escape(heading)}</a>"
            for anchor, (heading, _) in zip(anchors, sections, strict=True)
        )
        body = f"<nav>{links}</nav>\n{body}"
    page = (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n{head}\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n{body}\n</body>\n</html>\n"
    )
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(page)
    return path
