"""Tests for the command line: ``python -m famviz stream PATH ...``.

Every contract is checked twice:

- in-process, through ``famviz.cli.main(argv)`` with the output captured at the file-descriptor
  level: fast (a tiny random Llama loads in ~0.1 s), so it runs in the default suite;
- in a real subprocess (``python -m famviz``), marked ``slow``: each one pays ~3 s (errors found
  before the model loads) to ~8 s (a model load) just to import torch and transformers on 2 cores.
  Those runs go through a small thread pool so the slow suite stays tolerable.

The tiny model is a random 2-layer Llama with the bundled SmolLM2 tokenizer, so documents tokenize
exactly as with the real model while the CLI stays fast.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    SUPPORTED_FAMILIES,
    assert_one_line_error,
    auto_dtype_name,
    bundled_tokenizer,
    long_text,
    run_cli,
    run_cli_in_process,
    save_tiny_gpt2_dir,
    save_tiny_llama_dir,
)

import famviz

SUMMARY_TYPES = {
    "mode": str,
    "tokens": int,
    "blocks": int,
    "block_size": int,
    "fam_len": int,
    "mem_blocks": int,
    "nll_mean": float,
    "seconds": float,
    "tokens_per_s": float,
    "peak_rss_mb": float,
    "state_bytes": int,
    "device": str,
    "dtype": str,
}
# Small geometry: 150 tokens -> 5 blocks of 32 (the last one partial).
GEOMETRY = dict(block_size=32, fam_len=8, mem_blocks=2, max_tokens=150)
CUDA = torch.cuda.is_available()
EXPECTED_DEVICE = "cuda:0" if CUDA else "cpu"


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with the bundled tokenizer, saved for ``--model``."""
    return save_tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    return save_tiny_gpt2_dir(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="module")
def document(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("docs") / "doc.txt"
    path.write_text(long_text(paragraphs=10), encoding="utf-8")  # ~550 tokens
    return path


@pytest.fixture(scope="module")
def document_tokens(document) -> int:
    ids, _ = famviz.tokenize_document(bundled_tokenizer(), document.read_text(encoding="utf-8"))
    return len(ids)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny_model_dir, gpt2_dir, document) -> dict:
    """Files and directories for the bad-input cases."""
    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "empty.txt").write_bytes(b"")
    (root / "binary.bin").write_bytes(b"\x00\x01\x02binary\x00data\xff\xfe" * 50)
    (root / "latin1.txt").write_bytes(b"caf\xe9 au lait, cr\xe8me br\xfbl\xe9e\n")
    (root / "a-directory").mkdir()
    return {"root": root, "model": tiny_model_dir, "gpt2": gpt2_dir, "doc": document}


# -- checks ---------------------------------------------------------------------------------------
def stream_args(path, model_dir, mode, *, block_size, fam_len, mem_blocks, max_tokens, extra=()):
    return [
        "stream",
        path,
        "--mode",
        mode,
        "--block-size",
        block_size,
        "--fam-len",
        fam_len,
        "--mem-blocks",
        mem_blocks,
        "--max-tokens",
        max_tokens,
        "--model",
        model_dir,
        "--json",
        *extra,
    ]


def parse_summary(stdout: str) -> dict:
    """stdout must be exactly one JSON object (one line), nothing else."""
    assert stdout.endswith("\n") and stdout.count("\n") == 1, f"stdout is not one line: {stdout!r}"
    summary = json.loads(stdout)
    assert isinstance(summary, dict)
    return summary


def check_summary(
    summary: dict,
    mode: str,
    *,
    tokens: int,
    block_size: int,
    fam_len: int,
    mem_blocks: int,
    vocab_size: int,
    dtype: str | None = None,
) -> None:
    for key, kind in SUMMARY_TYPES.items():
        assert key in summary, f"missing key {key!r} in {sorted(summary)}"
        value = summary[key]
        assert type(value) is kind, f"{key}={value!r} is {type(value).__name__}, expected {kind.__name__}"
    assert summary["mode"] == mode
    assert summary["tokens"] == tokens
    assert summary["blocks"] == math.ceil(tokens / block_size)
    assert summary["block_size"] == block_size
    assert summary["fam_len"] == (fam_len if mode == "fam" else 0)  # only fam mode has a FAM
    assert summary["mem_blocks"] == mem_blocks
    assert math.isfinite(summary["nll_mean"])
    # A random model with tiny weights predicts a nearly uniform distribution: NLL ~ ln(vocab) nats.
    assert abs(summary["nll_mean"] - math.log(vocab_size)) < 1.5, summary["nll_mean"]
    assert summary["seconds"] > 0
    assert summary["tokens_per_s"] > 0
    assert summary["tokens_per_s"] == pytest.approx(tokens / summary["seconds"], rel=0.05)
    assert summary["peak_rss_mb"] > 50  # torch alone takes more than that
    assert summary["state_bytes"] > 0
    assert summary["device"] == EXPECTED_DEVICE
    assert summary["dtype"] == (dtype or auto_dtype_name())


def check_trace(path: Path, summary: dict, mode: str, document: Path) -> None:
    """The saved trace reloads without a model and agrees with the summary."""
    assert summary["trace"] == str(path)
    assert summary["trace_bytes"] > 0
    assert path.is_file()
    assert not path.with_name(path.name + ".partial").exists()
    trace = famviz.Trace.load(path)
    assert trace.n_tokens == summary["tokens"]
    assert trace.n_blocks == summary["blocks"]
    assert trace.text == document.read_text(encoding="utf-8")
    assert len(trace.offsets) == trace.n_tokens
    nll = trace["tokens.nll"]
    assert nll.shape == (summary["tokens"],)
    assert np.isnan(nll[0])  # nothing predicts the first token
    assert float(np.nanmean(nll)) == pytest.approx(summary["nll_mean"], rel=1e-4)
    assert trace["block.0.share"].shape[0] == summary["blocks"]
    if mode == "fam":
        assert trace["fam.1.state"].shape[:2] == (summary["blocks"], summary["fam_len"])
    else:
        assert "fam.0.state" not in trace


def stderr_is_progress_only(stderr: str, mode: str) -> bool:
    """Every piece of stderr is a tqdm progress line for ``mode`` (no warnings, no stray logs)."""
    pieces = [p for p in stderr.replace("\r", "\n").split("\n") if p.strip()]
    return all(p.startswith(f"{mode}:") for p in pieces)


# -- bad input: one line on stderr, nothing on stdout -------------------------------------------
def _doc(ctx, *rest):
    return ["stream", ctx["doc"], "--model", ctx["model"], *rest]


BAD_INPUTS = {
    # id: (argv builder, substrings of the one stderr line)
    "missing-file": (lambda c: ["stream", c["root"] / "missing.txt", "--model", c["model"]], ("not found",)),
    "empty-file": (lambda c: ["stream", c["root"] / "empty.txt", "--model", c["model"]], ("empty",)),
    "binary-file": (lambda c: ["stream", c["root"] / "binary.bin", "--model", c["model"]], ("binary",)),
    "undecodable-file": (lambda c: ["stream", c["root"] / "latin1.txt", "--model", c["model"]], ("UTF-8",)),
    "directory": (lambda c: ["stream", c["root"] / "a-directory", "--model", c["model"]], ("directory",)),
    "block-size-0": (lambda c: _doc(c, "--block-size", "0"), ("block size",)),
    "block-size-negative": (lambda c: _doc(c, "--block-size", "-3"), ("block size", "-3")),
    "fam-len-negative": (lambda c: _doc(c, "--fam-len", "-1"), ("FAM length", "-1")),
    "mem-blocks-negative": (lambda c: _doc(c, "--mem-blocks", "-1"), ("memory blocks", "-1")),
    "max-tokens-0": (lambda c: _doc(c, "--max-tokens", "0"), ("--max-tokens",)),
    "unsupported-model": (lambda c: ["stream", c["doc"], "--model", c["gpt2"]], ("gpt2", *SUPPORTED_FAMILIES)),
    "nonexistent-model": (lambda c: ["stream", c["doc"], "--model", c["root"] / "no-such-model"], ("no-such-model",)),
    "uncached-hub-id": (
        lambda c: ["stream", c["doc"], "--model", "no-such-org/no-such-model"],
        ("not in the local Hugging Face cache", "never downloads", "local model directory"),
    ),
    "bad-adapter": (lambda c: _doc(c, "--adapter", c["root"] / "no-such-adapter"), ("no-such-adapter",)),
    # one block: no progress bar (see test_unknown_channel_with_progress_bar_is_one_line_error)
    "unknown-channel": (
        lambda c: _doc(
            c, "--channels", "no.such.channel", "--max-tokens", "10", "--trace", c["root"] / "never-written.npz"
        ),
        ("no.such.channel",),
    ),
    "cuda-without-gpu": (lambda c: _doc(c, "--device", "cuda"), ("CUDA",)),
}


def _skip_if_not_applicable(case: str) -> None:
    if case == "cuda-without-gpu" and CUDA:
        pytest.skip("a CUDA GPU is available here")


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_in_process(case, bad_inputs, capfd):
    _skip_if_not_applicable(case)
    build, contains = BAD_INPUTS[case]
    status, out, err = run_cli_in_process(build(bad_inputs), capfd)
    assert status == 2
    assert_one_line_error(status, out, err, contains=("famviz: error:", *contains))


@pytest.fixture(scope="module")
def bad_input_runs(bad_inputs) -> dict:
    """Every bad-input case as a real subprocess, two at a time (one per core)."""
    cases = [c for c in BAD_INPUTS if not (c == "cuda-without-gpu" and CUDA)]
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        futures = {case: pool.submit(run_cli, BAD_INPUTS[case][0](bad_inputs)) for case in cases}
        return {case: future.result() for case, future in futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_subprocess(case, bad_input_runs):
    _skip_if_not_applicable(case)
    proc = bad_input_runs[case]
    assert proc.returncode == 2
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, contains=("famviz: error:", *BAD_INPUTS[case][1]))


def test_argparse_errors_are_not_tracebacks(bad_inputs, capfd):
    """Bad option values caught by argparse: usage on stderr, exit 2, nothing on stdout."""
    for argv in (
        _doc(bad_inputs, "--mode", "sideways"),
        _doc(bad_inputs, "--block-size", "ten"),
        _doc(bad_inputs, "--dtype", "int8"),
    ):
        status, out, err = run_cli_in_process(argv, capfd)
        assert status == 2 and out == "" and "Traceback" not in err and "error:" in err


def test_unknown_channel_with_progress_bar_is_one_line_error(bad_inputs, capfd):
    status, out, err = run_cli_in_process(
        _doc(
            bad_inputs,
            "--channels",
            "no.such.channel",
            "--block-size",
            32,
            "--trace",
            bad_inputs["root"] / "never-written.npz",
        ),
        capfd,
    )
    assert_one_line_error(status, out, err, contains=("no.such.channel",))


# -- --trace OUT that cannot be written: refused before streaming ----------------------------------
def test_trace_into_missing_folder_is_one_line_error(bad_inputs, capfd):
    out_path = bad_inputs["root"] / "no-such-folder" / "trace.npz"
    status, out, err = run_cli_in_process(_doc(bad_inputs, "--max-tokens", "20", "--trace", out_path), capfd)
    assert_one_line_error(status, out, err)


def test_trace_onto_directory_is_one_line_error(tmp_path, bad_inputs, capfd):
    target = tmp_path / "out"
    target.mkdir()
    try:
        status, out, err = run_cli_in_process(_doc(bad_inputs, "--max-tokens", "20", "--trace", target), capfd)
        assert_one_line_error(status, out, err)
    finally:
        assert not (tmp_path / "out.partial").exists(), "a partial trace file was left behind"


# -- streaming: in-process ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", famviz.MODES)
def test_stream_json_and_trace_in_process(mode, tiny_model_dir, document, tmp_path, capfd):
    out_path = tmp_path / f"{mode}.npz"
    args = stream_args(document, tiny_model_dir, mode, **GEOMETRY, extra=["--trace", out_path])
    status, out, err = run_cli_in_process(args, capfd)
    assert status == 0, err
    summary = parse_summary(out)
    check_summary(
        summary,
        mode,
        tokens=GEOMETRY["max_tokens"],
        block_size=GEOMETRY["block_size"],
        fam_len=GEOMETRY["fam_len"],
        mem_blocks=GEOMETRY["mem_blocks"],
        vocab_size=len(bundled_tokenizer()),
    )
    assert summary["model"] == str(tiny_model_dir) and summary["document"] == Path(document).name
    check_trace(out_path, summary, mode, document)
    assert "Traceback" not in err


def test_stream_records_the_memory_lens_only_where_asked(tiny_model_dir, document, tmp_path, capfd):
    from famviz import Trace

    out_path = tmp_path / "lens.npz"
    args = stream_args(document, tiny_model_dir, "fam", **GEOMETRY, extra=["--trace", out_path])
    status, _, err = run_cli_in_process([*args, "--lens", "-1", "--lens-top-k", "3"], capfd)
    assert status == 0, err
    trace = Trace.load(out_path)
    top = trace.meta["n_layers"] - 1
    assert trace.layers_of("fam.lens") == [top] and trace[f"fam.{top}.lens"].shape[1:] == (GEOMETRY["fam_len"], 3)
    assert "block.share" in trace.keys  # --lens adds to the default channels
    status, _, err = run_cli_in_process([*args, "--slots", "0"], capfd)
    assert status == 0, err
    slots = Trace.load(out_path)
    assert {"fam.slot_norm", "fam.slot_update", "fam.slot_received", "fam.slot_read"} <= set(slots.keys)
    assert slots.layers_of("fam.slot_read") == [0] and "fam.lens" not in slots.keys
    status, _, _ = run_cli_in_process([*args[: args.index("--trace")], "--trace", tmp_path / "plain.npz"], capfd)
    assert status == 0 and "fam.lens" not in Trace.load(tmp_path / "plain.npz").keys
    for bad, words in (
        (["--lens", "x"], "--lens layers must be whole numbers"),
        (["--lens-top-k", "0", "--lens", "0"], "at least 1"),
    ):
        status, _, err = run_cli_in_process([*args, *bad], capfd)
        assert status == 2 and words in err


def test_stream_with_an_adapter_takes_its_geometry_unless_given(document, tmp_path, capfd):
    """As the app does: --adapter sets block size, FAM length and memory blocks the run leaves out."""
    from helpers import write_random_lora_adapter

    model_dir, adapter_dir = write_random_lora_adapter(tmp_path)  # trained with block 32, FAM 4, memory 0
    args = ["stream", document, "--model", model_dir, "--adapter", adapter_dir, "--mode", "fam"]
    status, out, err = run_cli_in_process([*args, "--max-tokens", 64, "--json", "--dtype", "float32"], capfd)
    assert status == 0, err
    summary = parse_summary(out)
    assert (summary["block_size"], summary["fam_len"], summary["mem_blocks"]) == (32, 4, 0)
    assert "note:" not in err  # the adapter's own geometry: nothing to note


def test_stream_with_an_adapter_names_it_and_notes_another_geometry(document, tmp_path, capfd):
    from helpers import write_random_lora_adapter

    model_dir, adapter_dir = write_random_lora_adapter(tmp_path)  # trained with block 32, FAM 4, memory 0
    out_path = tmp_path / "run.npz"
    args = [
        "stream",
        document,
        "--model",
        model_dir,
        "--adapter",
        adapter_dir,
        "--mode",
        "fam",
        "--block-size",
        32,
        "--fam-len",
        4,
        "--mem-blocks",
        1,
        "--max-tokens",
        64,
        "--json",
        "--dtype",
        "float32",
        "--trace",
        out_path,
    ]
    status, out, err = run_cli_in_process(args, capfd)
    assert status == 0, err
    assert parse_summary(out)["adapter"] == "adapter" and famviz.Trace.load(out_path).meta["adapter"] == "adapter"
    assert "famviz: note: adapter adapter was trained with memory blocks 0, this run uses 1" in err
    own = [0 if previous == "--mem-blocks" else a for previous, a in zip([None, *args[:-1]], args, strict=True)]
    status, out, err = run_cli_in_process(own, capfd)  # the adapter's own geometry: nothing to note
    assert status == 0 and "note:" not in err


def test_max_tokens_streams_the_start_of_a_file_over_the_size_limit(tiny_model_dir, tmp_path, capfd):
    from famviz.io.documents import MAX_DOCUMENT_BYTES

    big = tmp_path / "big.txt"
    line = b"The memory keeps what the window forgets.\n"
    with open(big, "wb") as file:
        file.write(line * ((MAX_DOCUMENT_BYTES + 5 * 1024**2) // len(line)))
    size = f"{big.stat().st_size / 1024**2:.1f} MB"
    args = ["stream", big, "--model", tiny_model_dir, "--max-tokens", 50, "--no-trace", "--json", "--dtype", "float32"]
    status, out, err = run_cli_in_process(args, capfd)
    assert status == 0, err
    assert parse_summary(out)["tokens"] == 50
    assert f"famviz: note: read the first 3,200 bytes of a {size} file (enough for --max-tokens 50)" in err
    status, out, err = run_cli_in_process(args[:3] + args[5:], capfd)  # the whole file: refused, one line
    assert_one_line_error(status, out, err, contains=("big.txt", f"file is {size}, over the 50.0 MB limit"))


def test_no_trace_in_process(tiny_model_dir, document, capfd):
    args = stream_args(document, tiny_model_dir, "fam", **GEOMETRY, extra=["--no-trace"])
    status, out, err = run_cli_in_process(args, capfd)
    assert status == 0, err
    summary = parse_summary(out)
    assert summary["trace_bytes"] == 0
    assert summary["trace"] is None
    assert summary["tokens"] == GEOMETRY["max_tokens"]
    assert math.isfinite(summary["nll_mean"])


def test_without_max_tokens_streams_the_whole_document(tiny_model_dir, document, document_tokens, capfd):
    status, out, err = run_cli_in_process(
        [
            "stream",
            document,
            "--model",
            tiny_model_dir,
            "--block-size",
            256,
            "--no-trace",
            "--json",
            "--dtype",
            "float32",
        ],
        capfd,
    )
    assert status == 0, err
    summary = parse_summary(out)
    assert summary["tokens"] == document_tokens > 256
    assert summary["blocks"] == math.ceil(document_tokens / 256)


def test_max_tokens_over_the_length_keeps_the_whole_document(tiny_model_dir, tmp_path, capfd):
    """One block only: no progress bar, so stderr stays empty."""
    path = tmp_path / "short.md"
    path.write_text("# Title\n\nA short document.\n", encoding="utf-8")
    ids, _ = famviz.tokenize_document(bundled_tokenizer(), path.read_text(encoding="utf-8"))
    status, out, err = run_cli_in_process(
        ["stream", path, "--model", tiny_model_dir, "--max-tokens", 10_000, "--json"], capfd
    )
    assert status == 0, err
    summary = parse_summary(out)
    assert (summary["tokens"], summary["blocks"]) == (len(ids), 1)
    assert err == ""


def test_progress_goes_to_stderr_in_process(tiny_model_dir, document, capfd):
    args = stream_args(document, tiny_model_dir, "bswa", **GEOMETRY, extra=["--no-trace", "--dtype", "float32"])
    status, out, err = run_cli_in_process(args, capfd)
    assert status == 0
    parse_summary(out)  # one JSON object even though a bar was drawn
    assert f"{GEOMETRY['max_tokens']}/{GEOMETRY['max_tokens']}" in err  # the finished bar
    assert stderr_is_progress_only(err, "bswa"), err


def test_dtype_float32_in_process(tiny_model_dir, document, capfd):
    args = stream_args(document, tiny_model_dir, "fam", **GEOMETRY, extra=["--no-trace", "--dtype", "float32"])
    status, out, err = run_cli_in_process(args, capfd)
    assert status == 0, err
    assert parse_summary(out)["dtype"] == "float32"


def test_human_readable_output_in_process(tiny_model_dir, document, capfd):
    status, out, _ = run_cli_in_process(
        ["stream", document, "--model", tiny_model_dir, "--max-tokens", 50, "--no-trace"], capfd
    )
    assert status == 0
    fields = dict(line.split(":", 1) for line in out.splitlines())
    assert {k.strip() for k in fields} >= set(SUMMARY_TYPES)
    assert fields["tokens".rjust(13)].strip() == "50"


def test_state_bytes_is_bounded_except_in_full_mode(tiny_model_dir, document):
    """What ``state_bytes`` reports: bswa/fam carry a constant-size state, full mode's KV cache grows.

    Through the library with one loaded model: six CLI runs would reload the model six times.
    """
    loaded = famviz.load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    ids, _ = famviz.tokenize_document(loaded.tokenizer, document.read_text(encoding="utf-8"))
    state = {}
    for mode in famviz.MODES:
        config = famviz.FamConfig(mode=mode, block_size=8, fam_len=4, mem_blocks=1)
        for n in (32, 64):
            state[mode, n] = famviz.Stream(loaded, config, record=False).run(ids[:n]).state_bytes
    assert state["bswa", 32] == state["bswa", 64]
    assert state["fam", 32] == state["fam", 64]
    assert state["fam", 64] > state["bswa", 64]  # the FAM itself
    assert state["full", 64] > state["full", 32]


# -- streaming: real subprocesses -----------------------------------------------------------------
@pytest.fixture(scope="module")
def stream_runs(tiny_model_dir, document, tmp_path_factory) -> dict:
    """``python -m famviz stream`` for each mode (with --trace) and once with --no-trace."""
    out_dir = tmp_path_factory.mktemp("traces")
    jobs = {
        mode: stream_args(document, tiny_model_dir, mode, **GEOMETRY, extra=["--trace", out_dir / f"{mode}.npz"])
        for mode in famviz.MODES
    }
    jobs["no-trace"] = stream_args(document, tiny_model_dir, "fam", **GEOMETRY, extra=["--no-trace"])
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        futures = {name: pool.submit(run_cli, args) for name, args in jobs.items()}
        runs = {name: future.result() for name, future in futures.items()}
    return {"runs": runs, "out_dir": out_dir}


@pytest.mark.slow
@pytest.mark.parametrize("mode", famviz.MODES)
def test_stream_json_and_trace_subprocess(mode, stream_runs, document, tiny_model_dir):
    proc = stream_runs["runs"][mode]
    assert proc.returncode == 0, proc.stderr
    summary = parse_summary(proc.stdout)
    check_summary(
        summary,
        mode,
        tokens=GEOMETRY["max_tokens"],
        block_size=GEOMETRY["block_size"],
        fam_len=GEOMETRY["fam_len"],
        mem_blocks=GEOMETRY["mem_blocks"],
        vocab_size=len(bundled_tokenizer()),
    )
    check_trace(stream_runs["out_dir"] / f"{mode}.npz", summary, mode, document)


@pytest.mark.slow
@pytest.mark.parametrize("mode", famviz.MODES)
def test_progress_bar_goes_to_stderr_subprocess(mode, stream_runs):
    """5 blocks draw a progress bar; it is all on stderr and stdout still parses as one JSON object."""
    proc = stream_runs["runs"][mode]
    assert proc.returncode == 0, proc.stderr
    parse_summary(proc.stdout)
    assert f"{GEOMETRY['max_tokens']}/{GEOMETRY['max_tokens']}" in proc.stderr
    assert stderr_is_progress_only(proc.stderr, mode), proc.stderr


@pytest.mark.slow
def test_no_trace_subprocess(stream_runs):
    proc = stream_runs["runs"]["no-trace"]
    assert proc.returncode == 0, proc.stderr
    summary = parse_summary(proc.stdout)
    assert summary["trace_bytes"] == 0
    assert summary["trace"] is None
    assert summary["tokens"] == GEOMETRY["max_tokens"]


GPL3 = Path("/usr/share/common-licenses/GPL-3")


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(not GPL3.is_file(), reason="needs /usr/share/common-licenses/GPL-3")
def test_stream_bundled_model_subprocess():
    proc = run_cli(
        [
            "stream",
            GPL3,
            "--mode",
            "fam",
            "--block-size",
            256,
            "--fam-len",
            64,
            "--mem-blocks",
            1,
            "--max-tokens",
            600,
            "--json",
        ]
    )
    assert proc.returncode == 0, proc.stderr
    summary = parse_summary(proc.stdout)
    assert summary["tokens"] == 600
    assert summary["blocks"] == 3
    assert summary["fam_len"] == 64 and summary["mem_blocks"] == 1 and summary["block_size"] == 256
    assert summary["dtype"] == auto_dtype_name()
    assert summary["device"] == EXPECTED_DEVICE
    assert math.isfinite(summary["nll_mean"])
    # Without an adapter the FAM is untrained and hurts (README: ~3.7 nats on block 0, ~9 after the first
    # feedback update; ~7 overall here), but it stays a probability: positive, finite, bounded.
    assert 0 < summary["nll_mean"] < 12, summary["nll_mean"]
    assert "Traceback" not in proc.stderr
    print(
        f"bundled model, 600 tokens: {summary['seconds']} s, {summary['tokens_per_s']} tok/s, "
        f"nll {summary['nll_mean']:.3f}, peak RSS {summary['peak_rss_mb']} MB"
    )


def test_cli_and_app_share_one_table_of_defaults_and_limits(capfd, tmp_path):
    """The CLI's defaults are the app's (famviz.core.config.TOOL_DEFAULTS), and it refuses what the app refuses."""
    from famviz.app import inputs
    from famviz.cli import build_parser
    from famviz.core.config import TOOL_DEFAULTS

    assert inputs.DEFAULT_SETTINGS == TOOL_DEFAULTS
    from famviz.commands.common import run_config

    for command in (["stream", "x.txt"], ["passkey"]):
        config = run_config(build_parser().parse_args(command), "fam")  # no --adapter: the app's defaults
        assert (config.block_size, config.fam_len, config.mem_blocks) == (
            TOOL_DEFAULTS.block_size,
            TOOL_DEFAULTS.fam_len,
            TOOL_DEFAULTS.mem_blocks,
        )
    doc = tmp_path / "doc.txt"
    doc.write_text("some words " * 50)
    status, out, err = run_cli_in_process(["stream", str(doc), "--mode", "fam", "--fam-len", "0"], capfd)
    assert_one_line_error(status, out, err, contains=("FAM length must be from 1",))


def test_fam_norm_follows_the_adapter_unless_given(tmp_path):
    """An adapter trained with --fam-norm keep is streamed with it (the rule is part of how its memory
    works); --fam-norm overrides it; without an adapter it is the paper's grow."""
    import json

    from famviz.cli import build_parser
    from famviz.commands.common import run_config
    from famviz.io.adapters import ADAPTER_FORMAT, ADAPTER_META

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    fam = {"mode": "fam", "block_size": 256, "fam_len": 64, "mem_blocks": 0, "fam_norm": "keep"}
    (adapter / ADAPTER_META).write_text(json.dumps({"format": ADAPTER_FORMAT, "fam": fam}))
    for command, expected in (
        (["passkey", "--adapter", str(adapter)], "keep"),
        (["stream", "x.txt", "--adapter", str(adapter), "--fam-norm", "grow"], "grow"),
        (["ablate", "--adapter", str(adapter)], "keep"),
        (["passkey"], "grow"),
    ):
        assert run_config(build_parser().parse_args(command), "fam").fam_norm == expected, command


def test_every_command_has_its_module_with_options_and_a_run():
    import importlib

    from famviz.cli import build_parser
    from famviz.commands import COMMANDS

    parser = build_parser()
    choices = parser._subparsers._group_actions[0].choices
    assert list(choices) == list(COMMANDS)
    for name in COMMANDS:
        module = importlib.import_module(f"famviz.commands.{name}")
        required = {"stream": ["doc.txt"], "export": ["t.npz", "--figure", "heatmap", "--out", "x.png"]}
        assert parser.parse_args([name, *required.get(name, [])]).handler is module.run, name


@pytest.mark.parametrize("command", ["", "stream", "passkey", "ablate", "export", "train", "evaluate", "bench", "app"])
def test_help_imports_no_torch(command):
    """Parsing and --help load only the command line: torch, transformers and numpy come with the work."""
    import subprocess
    import sys

    probe = (
        "import sys, contextlib, io\n"
        "from famviz.cli import build_parser\n"
        f"argv = {[command, '--help'] if command else ['--help']!r}\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "    build_parser().parse_args(argv)\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'numpy', 'gradio') if m in sys.modules)\n"
        "print(len(out.getvalue()) > 100, heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True []"
