"""The page's files (shipped in the package: no CDN, works offline) and the HTML report of
``loralens screen --html``: the same page with its script, style and the records inlined."""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from loralens.atomic import open_regular, replaceable, write_file_atomic

_LINK = '<link rel="stylesheet" href="/static/app.css">'
_SCRIPT = '<script src="/static/app.js" defer></script>'
_TITLE = "<title>loralens screening report</title>"


def asset(name: str) -> str:
    """A file of the page: ``index.html``, ``app.js`` or ``app.css``."""
    return resources.files("loralens.serve").joinpath("static", name).read_text("utf-8")


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a ``screen`` report (JSON lines), last one per path, in path order."""
    records: dict[str, dict[str, Any]] = {}
    with open_regular(path, follow=False) as f:
        text = f.read().decode("utf-8", errors="replace")
    for line in text.splitlines():
        try:
            rec = json.loads(line)
            records[rec["path"]] = rec
        except (ValueError, KeyError, TypeError):
            continue
    return [records[k] for k in sorted(records)]


def html_report(records: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]] = ()) -> str:
    """One self-contained HTML page showing ``records`` (and the ``runs`` they came from)."""
    data = json.dumps({"records": list(records), "runs": list(runs)}, allow_nan=False)
    data = data.replace("<", "\\u003c")  # no "</script>" or "<!--" inside the data block
    page = asset("index.html")
    page = page.replace(_LINK, f"<style>\n{asset('app.css')}</style>")
    page = page.replace(_SCRIPT, "")
    page = page.replace("<title>loralens screening</title>", _TITLE)
    tail = (
        f'<script type="application/json" id="loralens-report">{data}</script>\n'
        f"<script>\n{asset('app.js')}</script>\n</body>"
    )
    return page.replace("</body>", tail)


def html_replaces(path: Path, overwrite: bool) -> bool:
    """Whether writing the HTML report ``path`` replaces a file there: only with ``overwrite``
    and only a loralens HTML report (anything else is refused, ``OutputExistsError``)."""
    return replaceable(path, overwrite=overwrite, ours=_is_report_page, what="a loralens report")


def _is_report_page(path: Path) -> bool:
    try:
        with open_regular(path, follow=False) as f:
            return _TITLE.encode() in f.read(4096)
    except OSError:
        return False


def write_html(
    records_path: Path,
    html_path: Path,
    runs: Sequence[dict[str, Any]] = (),
    *,
    replace: bool = False,
) -> None:
    """Write the HTML report of the JSON-lines report ``records_path``, whole; a file at
    ``html_path`` is replaced only with ``replace`` (see :func:`html_replaces`)."""
    write_file_atomic(html_path, html_report(read_records(records_path), runs), replace=replace)


__all__ = ["asset", "html_replaces", "html_report", "read_records", "write_html"]
