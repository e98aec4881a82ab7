"""One self-contained HTML page of titled sections, each paragraphs and an optional table (model card, compare)."""

from __future__ import annotations

import html

Section = tuple[str, list[str], list[list[str]]]
"""(title, paragraphs, table rows with a header row first; no table when empty)."""


def html_page(title: str, heading: str, sections: list[Section], *, max_width: str | None = None) -> str:
    """``sections`` under ``heading`` as an HTML page titled ``title``; every text is escaped."""
    width = f";max-width:{max_width}" if max_width else ""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        f"<style>body{{font-family:sans-serif;margin:2em{width}}}table{{border-collapse:collapse}}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}</style></head><body>",
        f"<h1>{html.escape(heading)}</h1>",
    ]
    for section_title, paragraphs, table in sections:
        parts.append(f"<h2>{html.escape(section_title)}</h2>")
        parts += [f"<p>{html.escape(paragraph)}</p>" for paragraph in paragraphs]
        if table:
            header, *rows = table
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(cell)}</th>" for cell in header) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows]
            parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
