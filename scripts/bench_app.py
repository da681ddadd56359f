"""Benchmark of the live memory inspector (app.py): the figures for the closing note.

    python scripts/bench_app.py [--blocks 6] [--repeats 3] [--long-tokens 100000] [--screenshot assets/app.png]

1. Start -> first plotted block, bundled model warm: in Chromium (Playwright), from the click on
   Start until the heatmap holds data (one-block runs, median of --repeats).
2. App overhead per block over the bare engine: the same GPL-3 blocks streamed by the engine alone
   (recording the app's channels) and through the served app (gradio_client, one update per block,
   every plot rebuilt after every block), interleaved --repeats times; medians of the per-block times.
3. Browser responsiveness with a long document (--long-tokens of GPL-3 repeated) streamed live into
   Chromium: size of one update, the browser's long tasks (main thread busy > 50 ms) and how long the page
   takes to answer while the stream runs (what a click would wait for). It uses a random 30-layer model of the
   bundled model's shape with a tiny width, so blocks come as fast as the app can draw them (a stress test; the
   model's own speed does not matter for what the browser receives).
Timings on a shared machine are noisy: read the medians, and the spread printed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import time
from itertools import pairwise
from pathlib import Path

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import famviz  # noqa: E402
from famviz.app import hub, inputs, inspector_tab, launch  # noqa: E402  (famviz.app sets the environment first)
from famviz.core.tokenize import tokenize_prefix  # noqa: E402
from famviz.viz import inspector  # noqa: E402

GPL3 = Path("/usr/share/common-licenses/GPL-3")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-dev-shm-usage",
]
PLOT_HAS_DATA = """(id) => {
    const plot = document.querySelector(`#${id} .js-plotly-plot`);
    if (!plot || !plot._fullData || !plot._fullData.length) return false;
    const t = plot._fullData[0]; const v = t.z || t.y || t.x;
    return !!v && v.length > 0;
}"""
LONG_TASKS = """() => { window.__longTasks = [];
    new PerformanceObserver(list => { for (const e of list.getEntries()) window.__longTasks.push(e.duration); })
        .observe({type: 'longtask', buffered: false}); }"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def median_spread(values: list[float]) -> str:
    values = sorted(values)
    return f"{statistics.median(values):.3f} (min {values[0]:.3f}, max {values[-1]:.3f}, n={len(values)})"


def serve(loaded, adapter=None):
    demo = launch.build_app(loaded, adapter)
    _, url, _ = demo.launch(
        server_name="127.0.0.1",
        server_port=free_port(),
        prevent_thread_lock=True,
        quiet=True,
        share=False,
        max_file_size=inputs.MAX_UPLOAD,
    )
    return demo, url


def stream_args(model_name, text, mode="fam", block=256, max_tokens=4096):
    # model, adapter, device, dtype, source, upload, pasted, passkey tokens, mode, compare, block, fam, mem, max, layers
    return [model_name, "", "auto", "auto", "paste", None, text, 2000, mode, "off", block, 64, 1, max_tokens, ""]


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1500, "height": 1900})
    page.goto(url, wait_until="load", timeout=120_000)
    page.locator("#status").filter(has_text="Ready").wait_for(timeout=120_000)
    return page


def set_number(page, elem_id, value):
    page.locator(f"#{elem_id} input").fill(str(value))


def wait_status(page, text, timeout_s):
    page.locator("#status").filter(has_text=text).wait_for(timeout=timeout_s * 1000)


# -- 1. Start -> first plotted block -------------------------------------------------------------------------
def first_block_latency(browser, url, block, repeats) -> list[float]:
    page = open_page(browser, url)
    set_number(page, "block-size", block)
    set_number(page, "max-tokens", block)  # one block per run
    times = []
    for i in range(repeats + 1):
        # Runs of the same document draw identical plots (the browser keeps the old drawing), so the
        # first block is recognised by its status line, which arrives in the same update as the plots.
        before = page.evaluate("() => document.querySelector('#status').innerText")
        started = time.perf_counter()
        page.locator("#start").click()
        # (the status box also shows Gradio's "processing" note above the old text: compare elapsed times)
        page.wait_for_function(
            "([old, id]) => { const s = document.querySelector('#status').innerText;"
            " const took = (t) => (t.match(/([\\d.]+) s elapsed/) || [])[1];"
            " return / 1 \\/ \\d+ blocks/.test(s) && took(s) !== undefined && took(s) !== took(old)"
            " && (" + PLOT_HAS_DATA + ")(id); }",
            arg=[before, "heatmap"],
            timeout=600_000,
            polling=20,
        )
        elapsed = time.perf_counter() - started
        wait_status(page, "Done", 600)
        if i:  # the first run warms up the browser's plotting code
            times.append(elapsed)
        print(f"  start -> first plotted block: {elapsed:.3f} s{'' if i else ' (warm-up, not counted)'}", flush=True)
    page.close()
    return times


# -- 2. overhead per block -------------------------------------------------------------------------------------
def engine_block_times(loaded, ids, block) -> list[float]:
    config = famviz.FamConfig(mode="fam", block_size=block, fam_len=64, mem_blocks=1)
    layers = inspector.default_trajectory_layers(loaded.config.num_hidden_layers)
    stream = famviz.Stream(loaded, config, channels=inspector.app_channels(layers, True))
    times = []
    for start in range(0, len(ids), block):
        began = time.perf_counter()
        stream.feed(ids[start : start + block])
        times.append(time.perf_counter() - began)
    return times


def app_block_times(client, model_name, text, block, n_tokens) -> list[float]:
    job = client.submit(*stream_args(model_name, text, block=block, max_tokens=n_tokens), api_name="/stream")
    stamps = []
    for update in job:
        if " · 0 / " not in update[0] and "tokens/s" in update[0]:
            stamps.append(time.perf_counter())
    if not stamps:
        raise RuntimeError("the app sent no block updates")
    # The first block's interval includes the run's start (tokenising, stream set-up): measure from block 1 on.
    return [b - a for a, b in pairwise(stamps)]


def refresh_cost(run) -> tuple[float, int]:
    """Seconds to build one update's figures and their JSON, and the JSON's size."""
    import plotly.io as pio

    began = time.perf_counter()
    outputs = inspector_tab.refresh(run)
    size = sum(
        len(pio.to_json(item)) if hasattr(item, "to_plotly_json") else len(item) if isinstance(item, str) else 0
        for item in outputs
    )
    return time.perf_counter() - began, size


# -- 3. long documents in the browser ------------------------------------------------------------------------
def tiny_wide_model(tokenizer):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=72,
        intermediate_size=144,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=len(tokenizer),
        max_position_embeddings=8192,
    )
    return famviz.prepare_model(transformers.LlamaForCausalLM(config).float(), tokenizer, "random-30-layer")


def long_document_responsiveness(browser, url, text, block, n_tokens, probe_after_s: float):
    page = open_page(browser, url)
    set_number(page, "block-size", block)
    set_number(page, "max-tokens", n_tokens)
    import tempfile

    document = Path(tempfile.mkdtemp()) / "gpl3-repeated.txt"
    document.write_text(text)
    page.set_input_files("#upload input[type=file]", str(document))
    page.locator("#source input[value=upload]").wait_for(timeout=30_000)
    page.wait_for_function("() => document.querySelector('#source input[value=upload]').checked", timeout=60_000)
    page.evaluate(LONG_TASKS)
    started = time.perf_counter()
    page.locator("#start").click()
    page.wait_for_function(PLOT_HAS_DATA, arg="heatmap", timeout=600_000)
    # While the stream runs, ask the page a question every second: the answer waits until the browser's
    # main thread is free, so its round trip is what a click or hover would wait for.
    latencies = []
    while time.perf_counter() < started + probe_after_s:
        began = time.perf_counter()
        page.evaluate("() => document.querySelector('#status').innerText.length")
        latencies.append(time.perf_counter() - began)
        time.sleep(1.0)
    status = page.locator("#status").inner_text()
    tasks = page.evaluate("() => window.__longTasks")
    dom_nodes = page.evaluate("() => document.getElementsByTagName('*').length")
    page.close()
    return latencies, tasks, status, dom_nodes, time.perf_counter() - started


def synthetic_run(n_tokens, block, loaded, fam_len=64):
    """A finished run of ``n_tokens`` with the app's channels at the model's shapes and random values:
    what the last update of a long document holds, without streaming it."""
    import numpy as np

    from famviz.core.trace import Trace

    cfg = loaded.config
    n_layers, heads, hidden = cfg.num_hidden_layers, cfg.num_attention_heads, 576
    layers = inspector.default_trajectory_layers(n_layers)
    config = famviz.FamConfig(mode="fam", block_size=block, fam_len=fam_len, mem_blocks=1)
    every = list(range(n_layers))
    trace = Trace(
        {"model": "synthetic", "config": config.to_dict(), "n_layers": n_layers, "dtype": "bfloat16"},
        {
            "tokens.nll": [],
            "block.share": every,
            "fam.share": every,
            "fam.read": every,
            "fam.norm": every,
            "fam.update": every,
            "fam.state": layers,
        },
    )
    rng = np.random.default_rng(0)
    text = (GPL3.read_text() + "\n\n") * (n_tokens // 7000 + 2)
    ids, offsets = tokenize_prefix(loaded.tokenizer, text, n_tokens)
    trace.describe_document("synthetic", text, offsets)
    run = inspector.Run(
        config=config,
        document="synthetic",
        total_tokens=len(ids),
        trace=trace,
        features=inspector.StateFeatures(layers),
        state="done",
    )
    for start in range(0, len(ids), block):
        n = len(ids[start : start + block])
        share = rng.random((n_layers, heads, 3)).astype(np.float32)
        states = rng.standard_normal((len(layers), fam_len, hidden)).astype(np.float16)
        trace.append_block(
            start,
            ids[start : start + block],
            {
                "tokens.nll": rng.random(n).astype(np.float32),
                "block.share": share / share.sum(-1, keepdims=True),
                "fam.share": rng.dirichlet([1, 1], (n_layers, heads)).astype(np.float32),
                "fam.read": rng.random((n_layers, n)).astype(np.float16) / n,
                "fam.norm": rng.random(n_layers).astype(np.float32),
                "fam.update": rng.random(n_layers).astype(np.float32),
                "fam.state": states,
            },
        )
        for i, layer in enumerate(layers):
            run.features.add(layer, states[i])
        run.blocks_done += 1
    run.tokens_done = len(ids)
    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=6, help="blocks per run for the overhead figure")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--long-tokens", type=int, default=100_000)
    parser.add_argument("--long-seconds", type=float, default=90.0, help="how long to stream the long document")
    parser.add_argument("--screenshot", default=None, help="save a screenshot of a finished GPL-3 run here")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: first,overhead,long")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    have_browser = os.access(CHROMIUM, os.X_OK)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (shared: timings are noisy)")
    loaded = famviz.load_model()
    print(f"model: {loaded.name}, {loaded.device}, {loaded.dtype}")
    text = GPL3.read_text()
    block = args.block_size
    ids, _ = tokenize_prefix(loaded.tokenizer, text, block * args.blocks)
    demo, url = serve(loaded)
    from gradio_client import Client

    client = Client(url, verbose=False)
    app_block_times(client, "", text, block, 2 * block)  # warm-up: first-call costs are not the app's
    results = {}
    playwright = browser = None
    if have_browser and not {"first", "long"} <= skip or args.screenshot:
        from playwright.sync_api import sync_playwright

        playwright = sync_playwright().start()
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    try:
        if "first" not in skip and browser is not None:
            print("1. Start -> first plotted block (Chromium, bundled model warm)")
            first = first_block_latency(browser, url, block, args.repeats)
            engine_one = [engine_block_times(loaded, ids[:block], block)[0] for _ in range(args.repeats)]
            results["first_block_s"] = statistics.median(first)
            print(
                f"   median {median_spread(first)} s; "
                f"the engine alone takes {median_spread(engine_one)} s for that block"
            )

        if "overhead" not in skip:
            print(
                f"2. overhead per block ({args.blocks} blocks of {block} tokens, fam 64, 1 memory block; "
                f"blocks after the first)"
            )
            engine, served = [], []
            context = demo.famviz_context
            throttle, context.redraw_seconds = context.redraw_seconds, 0.0  # every block fully redrawn
            for i in range(args.repeats):
                engine += engine_block_times(loaded, ids, block)[1:]
                served += app_block_times(client, "", text, block, len(ids))
                print(
                    f"   repeat {i + 1}: engine {statistics.median(engine):.3f} s/block, "
                    f"app {statistics.median(served):.3f} s/block",
                    flush=True,
                )
            context.redraw_seconds = throttle
            overhead = statistics.median(served) / statistics.median(engine) - 1
            results["overhead"] = overhead
            print(f"   engine alone: {median_spread(engine)} s/block")
            print(f"   through app:  {median_spread(served)} s/block")
            print(f"   app overhead per block: {100 * overhead:+.1f}% (target <= 20%)")
            updates = list(
                inspector_tab.stream_document(
                    hub.ModelHub(loaded, None, (None, None, "auto", "auto")),
                    *stream_args(None, text, block=block, max_tokens=len(ids)),
                    None,
                )
            )
            cost, size = refresh_cost(updates[-1][-1])
            print(
                f"   one update ({args.blocks} blocks): figures + JSON built in {cost * 1000:.0f} ms, "
                f"{size / 1024:.0f} KB"
            )

        if "long" not in skip and browser is not None:
            tiny = tiny_wide_model(loaded.tokenizer)
            long_text = (text + "\n\n") * (args.long_tokens // 7000 + 2)
            long_ids, _ = tokenize_prefix(tiny.tokenizer, long_text, args.long_tokens)
            print(
                f"3. long document: {len(long_ids):,} tokens of GPL-3 repeated, block {block}, "
                f"{-(-len(long_ids) // block)} blocks, random 30-layer model; streaming for ~{args.long_seconds:.0f} s"
            )
            demo_long, url_long = serve(tiny)
            try:
                latencies, tasks, status, nodes, seconds = long_document_responsiveness(
                    browser, url_long, long_text, block, args.long_tokens, args.long_seconds
                )
            except Exception:
                for context in browser.contexts:
                    for page in context.pages:
                        page.screenshot(path="/tmp/famviz-bench-failure.png")
                raise
            finally:
                demo_long.close()
            print(f"   reached: {status.splitlines()[0][:160]}")
            print(f"   page answer latency while streaming (main thread busy): {median_spread(latencies)} s")
            tasks = sorted(tasks)
            print(
                f"   browser long tasks (> 50 ms): {len(tasks)} in {seconds:.0f} s, "
                f"median {statistics.median(tasks) if tasks else 0:.0f} ms, max {tasks[-1] if tasks else 0:.0f} ms, "
                f"total {sum(tasks) / 1000:.1f} s; DOM nodes at the end: {nodes:,}"
            )
            end = synthetic_run(len(long_ids), block, tiny)
            cost, size = refresh_cost(end)
            print(
                f"   one update at the end of the document ({end.blocks_done} blocks, recorded shapes, random "
                f"values): figures + JSON "
                f"{cost * 1000:.0f} ms, {size / 1024:.0f} KB"
            )
            results.update(
                page_latency_s=statistics.median(latencies),
                page_latency_max_s=max(latencies),
                long_task_max_ms=tasks[-1] if tasks else 0,
                update_kb=size / 1024,
            )

        if args.screenshot and browser is not None:
            # The app as `python app.py` starts it (the shipped tuned adapter), on the whole example document.
            shot_demo, shot_url = serve(loaded, launch.startup_adapter(None, None))
            try:
                page = open_page(browser, shot_url)
                page.locator("#start").click()
                wait_status(page, "Done", 1800)
                page.locator("#layer input").click()
                page.get_by_role("option", name="layer 15", exact=True).click()
                time.sleep(2)
                page.screenshot(path=args.screenshot, full_page=True)
                page.close()
                print(f"screenshot: {args.screenshot}")
            finally:
                shot_demo.close()
    finally:
        if browser is not None:
            browser.close()
            playwright.stop()
        demo.close()
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
