"""The page in a real browser: Debian's headless chromium driven by Playwright's Python API.
Upload a file, see the summary, the layer table, the spectra and the predictions; a bad file
shows its error and joins the list; nothing is fetched from anywhere but the server. The HTML
report of `loralens screen --html` renders the same way from a file.

Skips, saying why, only where Playwright or chromium is missing (scripts/setup.sh installs
both where it can)."""

from __future__ import annotations

import shutil

import pytest
from serve_support import Server, safetensors_file

from loralens.serve.report import html_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright's Python package is not installed"
    )
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    s = Server(
        [runs["reg"], runs["cls"]], tmp_path_factory.mktemp("page-tmp"), "--max-concurrent", "1"
    )
    yield s
    s.stop()


def _texts(page, selector: str) -> list[str]:
    return [t.strip() for t in page.locator(selector).all_inner_texts()]


def test_upload_shows_table_spectra_and_predictions(browser, server, tmp_path):
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    failed: list[str] = []  # a GET answered 4xx/5xx: a missing asset (the favicon, say)
    page.on(
        "response",
        lambda r: (
            failed.append(f"{r.status} {r.url}")
            if r.request.method == "GET" and r.status >= 400
            else None
        ),
    )
    page.goto(server.url + "/")
    page.wait_for_selector("#runs tbody tr")
    assert [r.split("\t")[0] for r in _texts(page, "#runs tbody tr")] == ["reg", "cls"]

    page.set_input_files("#file", str(safetensors_file(tmp_path / "first.safetensors", seed=3)))
    page.wait_for_selector("#history tbody tr")
    assert page.inner_text("#result-title") == "first.safetensors"
    assert "peft" in page.inner_text("#summary")
    layers = _texts(page, "#layers tbody tr td.name")
    assert layers == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert page.locator("#spectra polyline").count() == 2
    legend = _texts(page, "#spectra-legend li")  # one entry per layer, in its line's colour
    assert legend == [f"{k + 1}. {name}" for k, name in enumerate(layers)]
    colours = page.eval_on_selector_all(
        "#spectra-legend li svg line", "ls => ls.map(l => l.getAttribute('stroke'))"
    )
    lines = page.eval_on_selector_all(
        "#spectra polyline", "ls => ls.map(l => l.getAttribute('stroke'))"
    )
    assert colours == lines and len(set(colours)) == 2
    # an interval's ends share their decimals (1.998 is not shown as 2 beside 1.93)
    assert page.evaluate("interval(1.93, 1.998)") == "[1.93, 2.00]"
    assert page.evaluate("interval(1.9312, 1.9318)") == "[1.9312, 1.9318]"
    predictions = _texts(page, "#predictions tbody tr")
    assert [p.split("\t")[:2] for p in predictions] == [
        ["reg (mlp-svd)", "y"],
        ["reg (mlp-svd)", "z"],
        ["cls (mlp-svd)", "c"],
    ]
    assert "p = " in predictions[2] and "label" in predictions[2]
    assert "no layer flags" in page.inner_text("#flags")

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b'\x08\x00\x00\x00\x00\x00\x00\x00{"a": 1}')
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#history tbody tr:nth-child(2)")
    assert "bad.safetensors" in page.inner_text("#status")
    assert page.locator("#status.error").count() == 1
    assert page.locator("#details").is_hidden()

    page.click("#history tbody tr:nth-child(1)")  # back to the first: the list compares them
    assert page.inner_text("#result-title") == "first.safetensors"
    assert page.locator("#details").is_visible()
    history = _texts(page, "#history tbody tr")
    assert history[0].startswith("first.safetensors") and history[1].startswith("bad.safetensors")
    assert all(u.startswith((server.url, "data:")) for u in requests), requests
    assert failed == [], failed
    page.close()


def test_a_flagged_or_misfit_adapter_is_marked_in_the_summary_table(browser, server, tmp_path):
    """A LoRA scaled by 10 is flagged by both runs' fit checks, one of another width fits
    neither: the history table marks each, and neither shows a green "no flags"."""
    from serve_support import lora

    import loralens as ll

    big = lora(seed=3)
    big = ll.LoRA([ll.LoRALayer(x.name, x.U * 10, x.V) for x in big.layers])
    ll.save_lora(big, tmp_path / "big")
    (tmp_path / "big" / "adapter_model.safetensors").rename(tmp_path / "big.safetensors")
    ll.save_lora(lora(seed=4, width=6), tmp_path / "narrow")
    (tmp_path / "narrow" / "adapter_model.safetensors").rename(tmp_path / "narrow.safetensors")
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server.url + "/")
    page.wait_for_selector("#runs tbody tr")
    assert all("test" in r and "LoRAs" in r for r in _texts(page, "#runs tbody tr"))
    page.set_input_files("#file", str(tmp_path / "big.safetensors"))
    page.wait_for_selector("#history tbody tr")
    assert "\u26a0 reg flags it" in page.inner_text("#flags")
    assert page.locator("#flags li.none").count() == 0
    page.set_input_files("#file", str(tmp_path / "narrow.safetensors"))
    page.wait_for_selector("#history tbody tr:nth-child(2)")
    big_row, narrow_row = _texts(page, "#history tbody tr")
    assert "\u26a0 reg" in big_row and "\u26a0 cls" in big_row, big_row
    assert "misfit reg" in narrow_row and "misfit cls" in narrow_row, narrow_row
    assert page.locator("#history tbody tr.flagged").count() == 2
    page.close()


def test_the_html_report_renders_from_a_file(browser, server, tmp_path):
    import httpx

    records = []
    for k in range(2):
        data = safetensors_file(tmp_path / f"a{k}.safetensors", seed=k).read_bytes()
        res = httpx.post(server.url + "/api/screen", files={"file": (f"a{k}.safetensors", data)})
        records.append(res.json())
    records.append({"path": "</script><b>x</b>", "error": "broken <b>not bold</b>", "status": 422})
    runs = httpx.get(server.url + "/api/runs").json()
    html = tmp_path / "report.html"
    html.write_text(html_report(records, runs))
    page = browser.new_page()
    page.goto(html.as_uri())
    page.wait_for_selector("#history tbody tr:nth-child(3)")
    assert page.locator("#upload").is_hidden()
    assert page.inner_text("#history-title") == "3 adapters screened"
    assert (
        page.locator("#layers tbody tr").count() == 2
        and page.locator("#spectra polyline").count() == 2
    )
    assert page.locator("#history b").count() == 0, "data was parsed as HTML"
    assert "</script><b>x</b>" in page.inner_text("#history")
    page.close()


def test_the_page_works_without_a_network(server):
    """Every file the page loads comes from the package (no CDN)."""
    import re

    import httpx

    page = httpx.get(server.url + "/").text
    links = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert [u for u in links if not u.startswith("data:")] == ["/static/app.css", "/static/app.js"]
    assert [u for u in links if u.startswith("data:image/svg+xml")], "no favicon: a 404"
    for asset in ("/static/app.js", "/static/app.css"):
        text = httpx.get(server.url + asset).text
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in text
