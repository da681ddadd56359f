"""The app in a real browser: Playwright driving Debian's Chromium headless (never `playwright install`).

Open the page, upload a file, Start, wait until the plots hold data, export an SVG, take a
screenshot (kept under the test's tmp dir; set FAMVIZ_SCREENSHOT=PATH to keep a copy).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-dev-shm-usage",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason="Debian's chromium is not installed"),
]

TEXT = "\n".join(f"Paragraph {i}: the memory keeps what the window forgets, block after block." for i in range(60))

# True once a gr.Plot holds a drawn Plotly figure whose first trace has data (_fullData: numpy arrays
# arrive base64-encoded and are decoded there).
PLOT_HAS_DATA = """(id) => {
    const plot = document.querySelector(`#${id} .js-plotly-plot`);
    if (!plot || !plot._fullData || !plot._fullData.length) return false;
    const trace = plot._fullData[0];
    const values = trace.z || trace.y || trace.x;
    return !!values && values.length > 0;
}"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served_app():
    from helpers import tiny_llama_with_bundled_tokenizer

    from famviz.app import inputs, launch

    loaded = tiny_llama_with_bundled_tokenizer(n_layers=4)
    demo = launch.build_app(loaded)
    _, url, _ = demo.launch(
        server_name="127.0.0.1",
        server_port=_free_port(),
        prevent_thread_lock=True,
        quiet=True,
        share=False,
        max_file_size=inputs.MAX_UPLOAD,
    )
    yield url
    demo.close()


@contextlib.contextmanager
def open_page(url: str, height: int):
    """A page of the served app in headless Debian Chromium, closed afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": height})
            page.goto(url, wait_until="load", timeout=120_000)
            yield page
        finally:
            browser.close()


def n_blocks_drawn(page) -> int:
    return page.evaluate("() => document.querySelector('#heatmap .js-plotly-plot')._fullData[0].z[0].length")


def test_upload_stream_export_and_screenshot(served_app, tmp_path):
    from playwright.sync_api import expect

    document = tmp_path / "memory-notes.txt"
    document.write_text(TEXT)
    screenshot = tmp_path / "app.png"
    with open_page(served_app, 1900) as page:
        expect(page.locator("#status")).to_contain_text("Ready", timeout=60_000)

        page.set_input_files("#upload input[type=file]", str(document))
        expect(page.locator("#source input[value=upload]")).to_be_checked(timeout=30_000)
        page.locator("#block-size input").fill("64")
        page.locator("#fam-len input").fill("16")
        page.locator("#start").click()

        expect(page.locator("#status")).to_contain_text("Done", timeout=240_000)
        expect(page.locator("#status")).to_contain_text("memory-notes.txt")
        for plot in ("heatmap", "heads", "trajectory", "dynamics", "lens", "slots", "nll"):
            page.wait_for_function(PLOT_HAS_DATA, arg=plot, timeout=60_000)
        lens = page.evaluate(
            "() => { const t = document.querySelector('#lens .js-plotly-plot')._fullData[0]; "
            "return [t.z.length, t.z[0].length, t.text[0][0]]; }"
        )
        assert lens[0] == 16 and lens[1] == n_blocks_drawn(page)  # FAM slots × blocks (the default: top layer)
        assert lens[2].count("<br>") == 4  # the slot's top 5 tokens on hover
        n_columns = page.evaluate("() => document.querySelector('#heatmap .js-plotly-plot')._fullData[0].z[0].length")
        assert n_columns > 1  # one column per block
        shaded = page.locator("#document .tok.s10")
        assert shaded.count() >= 1  # the most-read tokens are drawn darkest
        assert "read" in shaded.first.get_attribute("title")  # hover shows the value

        page.locator("#export-format input[value=svg]").check()
        page.locator("#export").click()
        expect(page.locator("#export-note")).to_contain_text("Exported", timeout=120_000)
        link = page.locator("#export-file a[href*='.svg']").first
        expect(link).to_be_attached(timeout=30_000)
        svg = page.request.get(link.get_attribute("href")).text()
        assert svg.lstrip().startswith("<svg") and "share on" in svg

        page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 50_000  # a drawn page, not a blank one
    if os.environ.get("FAMVIZ_SCREENSHOT"):
        shutil.copy(screenshot, os.environ["FAMVIZ_SCREENSHOT"])


def test_passkey_tab_fills_heatmap_and_retention_curve(served_app, tmp_path):
    from playwright.sync_api import expect

    screenshot = tmp_path / "passkey.png"
    with open_page(served_app, 1700) as page:
        page.get_by_role("tab", name="PassKey").click()
        page.locator("#pk-block-size input").fill("64")
        page.locator("#pk-fam-len input").fill("8")
        page.locator("#pk-lengths textarea, #pk-lengths input").first.fill("200,400")
        page.locator("#pk-trials input").fill("2")
        page.locator("#pk-sweep").click()
        expect(page.locator("#pk-sweep-status")).to_contain_text("Done", timeout=240_000)
        page.wait_for_function(PLOT_HAS_DATA, arg="pk-heatmap", timeout=60_000)
        panels = page.evaluate("() => document.querySelector('#pk-heatmap .js-plotly-plot')._fullData.length")
        assert panels == 3  # the three default modes

        page.locator("#pk-length input").fill("500")
        page.locator("#pk-watch").click()
        expect(page.locator("#pk-retention-status")).to_contain_text("Done", timeout=240_000)
        page.wait_for_function(PLOT_HAS_DATA, arg="pk-retention", timeout=60_000)

        page.locator("#pk-export-format input[value=svg]").check()
        page.locator("#pk-export").click()
        expect(page.locator("#pk-export-note")).to_contain_text("Exported", timeout=120_000)

        # FAM interventions: the layer x block heatmap fills, then exports like every figure.
        page.locator("#ab-method input[value=write-time]").check()
        page.locator("#ab-length input").fill("300")
        page.locator("#ab-run").click()
        expect(page.locator("#ab-status")).to_contain_text("Done", timeout=240_000)
        page.wait_for_function(PLOT_HAS_DATA, arg="ab-heatmap", timeout=60_000)
        rows = page.evaluate("() => document.querySelector('#ab-heatmap .js-plotly-plot')._fullData[0].y.length")
        assert rows == 4 + 1  # the tiny model's 4 layers and "all"
        page.locator("#pk-export-which input[value=interventions]").check()
        page.locator("#pk-export").click()
        expect(page.locator("#pk-export-note")).to_contain_text("interventions", timeout=120_000)
        page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 50_000
    if os.environ.get("FAMVIZ_SCREENSHOT_PASSKEY"):
        shutil.copy(screenshot, os.environ["FAMVIZ_SCREENSHOT_PASSKEY"])


def test_page_reads_right_errors_beside_start_one_tab_label_clean_stop(served_app, tmp_path):
    """What a first-time user sees: each plot explained, a bad number reported beside Start as well as in
    the status, Stop leaving no stray error markers, each tab named once after it is opened."""
    from playwright.sync_api import expect

    tab_labels = "() => [...document.querySelectorAll('[role=tab]')].map(e => e.textContent.trim())"
    error_markers = (
        "() => [...document.querySelectorAll('*')].filter(e => !e.children.length && "
        "e.textContent.trim() === 'Error').length"
    )
    with open_page(served_app, 1900) as page:
        expect(page.locator("#status")).to_contain_text("Ready", timeout=60_000)
        for plot in ("heatmap", "trajectory", "dynamics", "nll"):
            expect(page.locator(f"#note-{plot}")).to_be_visible()
        page.locator("#block-size input").fill("0")
        page.locator("#start").click()
        expect(page.locator("#start-error")).to_contain_text("Block size must be from 1", timeout=60_000)
        expect(page.locator("#status")).to_contain_text("Block size must be from 1")

        page.locator("#block-size input").fill("16")
        page.locator("#fam-len input").fill("8")
        page.locator("#pasted textarea").fill(TEXT * 6)
        page.locator("#start").click()
        expect(page.locator("#start-error")).to_have_text("", timeout=30_000)  # cleared by the next Start
        expect(page.locator("#status")).to_contain_text("Streaming", timeout=120_000)
        page.locator("#stop").click()
        expect(page.locator("#status")).to_contain_text("Stopped", timeout=120_000)
        page.wait_for_timeout(1500)
        assert page.evaluate(error_markers) == 0

        page.get_by_role("tab", name="PassKey").click()
        expect(page.locator("#pk-sweep")).to_be_visible(timeout=30_000)
        assert page.evaluate(tab_labels) == ["Memory inspector", "PassKey"]
        page.screenshot(path=str(tmp_path / "passkey-tab.png"))
