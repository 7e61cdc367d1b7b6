"""A small document model rendered twice: ``report.md`` (figures linked as files beside it) and a
self-contained ``report.html`` (figures embedded as base64 PNG, inline CSS, no external assets).

Text blocks may use two inline marks, ``code`` and **bold**; everything else is escaped.
"""
from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1180px;
margin:2em auto;padding:0 1.2em;color:#222;line-height:1.45}
h1{font-size:1.7em;border-bottom:2px solid #ccc;padding-bottom:.2em}
h2{font-size:1.3em;margin-top:1.8em;border-bottom:1px solid #ddd}
h3{font-size:1.08em}
table{border-collapse:collapse;margin:.6em 0;font-size:.86em}
th,td{border:1px solid #ccc;padding:.25em .55em;text-align:left;vertical-align:top}
th{background:#f2f2f2}
tr:nth-child(even) td{background:#fafafa}
td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1em 0}
figure img{max-width:100%;border:1px solid #e3e3e3}
figcaption{font-size:.86em;color:#555}
pre{background:#f6f6f6;padding:.7em;overflow-x:auto;font-size:.8em;white-space:pre-wrap}
code{background:#f3f3f3;padding:0 .2em}
details{margin:.5em 0}
summary{cursor:pointer;font-weight:600}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.4em .8em}
"""
_NUM = re.compile(r"^[−\-+]?\d[\d.,]*( ± [\d.,]+)?%?$|^n/a$")


def _inline_html(text: str) -> str:
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)


def _cell_md(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


@dataclass
class Report:
    title: str
    blocks: list = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("h", level, text))

    def text(self, text: str, note: bool = False) -> None:
        self.blocks.append(("p", text, note))

    def bullets(self, items) -> None:
        self.blocks.append(("ul", list(items)))

    def table(self, header, rows, caption: str = "") -> None:
        self.blocks.append(("table", list(header), [list(r) for r in rows], caption))

    def figure(self, path, caption: str) -> None:
        self.blocks.append(("img", Path(path), caption))

    def code(self, text: str) -> None:
        self.blocks.append(("pre", text))

    def details(self, summary: str, inner: "Report") -> None:
        """A collapsible part (in HTML; plain in Markdown)."""
        self.blocks.append(("details", summary, inner))

    # ------------------------------------------------------------------ markdown
    def to_markdown(self, base: Path | None = None) -> str:
        lines = [f"# {self.title}", ""]
        lines += self._md_blocks(base)
        return "\n".join(lines).rstrip() + "\n"

    def _md_blocks(self, base) -> list[str]:
        out = []
        for b in self.blocks:
            kind = b[0]
            if kind == "h":
                out += ["#" * b[1] + " " + b[2], ""]
            elif kind == "p":
                out += [("> " if b[2] else "") + b[1], ""]
            elif kind == "ul":
                out += [f"- {i}" for i in b[1]] + [""]
            elif kind == "table":
                header, rows, caption = b[1], b[2], b[3]
                if caption:
                    out += [f"*{caption}*", ""]
                out.append("| " + " | ".join(_cell_md(h) for h in header) + " |")
                out.append("|" + "|".join("---" for _ in header) + "|")
                out += ["| " + " | ".join(_cell_md(c) for c in r) + " |" for r in rows]
                out.append("")
            elif kind == "img":
                rel = b[1].name if base is None else b[1].relative_to(base).as_posix()
                out += [f"![{b[2]}]({rel})", "", f"*{b[2]}*", ""]
            elif kind == "pre":
                out += ["```", b[1], "```", ""]
            elif kind == "details":
                out += [f"**{b[1]}**", ""] + b[2]._md_blocks(base)
        return out

    # ------------------------------------------------------------------ html
    def to_html(self) -> str:
        body = "\n".join(self._html_blocks())
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(self.title)}</title><style>{CSS}</style></head>\n"
                f"<body>\n<h1>{html.escape(self.title)}</h1>\n{body}\n</body></html>\n")

    def _html_blocks(self) -> list[str]:
        out = []
        for b in self.blocks:
            kind = b[0]
            if kind == "h":
                out.append(f"<h{b[1]}>{_inline_html(b[2])}</h{b[1]}>")
            elif kind == "p":
                cls = ' class="note"' if b[2] else ""
                out.append(f"<p{cls}>{_inline_html(b[1])}</p>")
            elif kind == "ul":
                out.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in b[1]) + "</ul>")
            elif kind == "table":
                header, rows, caption = b[1], b[2], b[3]
                cap = f"<caption>{_inline_html(caption)}</caption>" if caption else ""
                head = "".join(f"<th>{_inline_html(str(h))}</th>" for h in header)
                body = "".join(
                    "<tr>" + "".join(
                        f'<td class="num">{_inline_html(str(c))}</td>' if _NUM.match(str(c))
                        else f"<td>{_inline_html(str(c))}</td>" for c in r) + "</tr>"
                    for r in rows)
                out.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody>"
                           "</table>")
            elif kind == "img":
                data = base64.b64encode(b[1].read_bytes()).decode("ascii")
                out.append(f'<figure><img alt="{html.escape(b[2])}" '
                           f'src="data:image/png;base64,{data}"><figcaption>'
                           f"{_inline_html(b[2])}</figcaption></figure>")
            elif kind == "pre":
                out.append(f"<pre>{html.escape(b[1])}</pre>")
            elif kind == "details":
                out.append(f"<details><summary>{_inline_html(b[1])}</summary>"
                           + "\n".join(b[2]._html_blocks()) + "</details>")
        return out

    def write(self, out_dir) -> tuple[Path, Path]:
        out_dir = Path(out_dir)
        md, page = out_dir / "report.md", out_dir / "report.html"
        md.write_text(self.to_markdown(out_dir), encoding="utf-8")
        page.write_text(self.to_html(), encoding="utf-8")
        return md, page
