"""Shared test helpers: tiny random models, and running the CLI in a subprocess or in-process.

Imported as ``helpers`` (pytest puts ``tests/`` on ``sys.path``: the folder has no ``__init__.py``).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

# Geometry shared by every tiny model: 2 layers, 4 query heads of 16 dims, 2 KV heads.
TINY_DIMS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)


def auto_dtype_name() -> str:
    """What ``--dtype auto`` resolves to on this machine's default device (bfloat16 where it is computed
    natively, else float32), as the CLI reports it."""
    from famviz.io.models import resolve_device, resolve_dtype

    return str(resolve_dtype("auto", resolve_device("auto"))).replace("torch.", "")


# -- models ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def bundled_tokenizer():
    """The bundled SmolLM2 tokenizer (converts the bundled model once if it is not cached yet)."""
    import transformers

    import famviz.io.models

    return transformers.AutoTokenizer.from_pretrained(famviz.io.models.bundled_model_dir())


def tiny_llama_with_bundled_tokenizer(n_layers: int = 2, seed: int = 0):
    """A tiny random Llama (float32) with the bundled tokenizer and its vocabulary, as a LoadedModel:
    the app's handlers and the browser tests run real text through it in seconds."""
    import torch
    import transformers

    import famviz

    tokenizer = bundled_tokenizer()
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
    )
    return famviz.prepare_model(transformers.LlamaForCausalLM(config).float(), tokenizer, "tiny")


def tiny_config(family: str, vocab_size: int = 128):
    """A tiny config of a supported family (``llama``, ``mistral``, ``qwen2``, ``qwen3``)."""
    import transformers

    if family == "llama":
        return transformers.LlamaConfig(vocab_size=vocab_size, **TINY_DIMS)
    if family == "mistral":
        return transformers.MistralConfig(vocab_size=vocab_size, sliding_window=None, **TINY_DIMS)
    if family == "qwen2":
        return transformers.Qwen2Config(vocab_size=vocab_size, use_sliding_window=False, **TINY_DIMS)
    if family == "qwen3":
        return transformers.Qwen3Config(vocab_size=vocab_size, head_dim=16, use_sliding_window=False, **TINY_DIMS)
    raise ValueError(f"no tiny config for {family!r}")


def tiny_loaded(family: str = "llama", vocab_size: int = 128, seed: int = 0, dtype=None):
    """``tiny_causal_lm`` prepared as a famviz LoadedModel (no tokenizer), in ``dtype`` (default float32)."""
    from famviz import prepare_model

    model = tiny_causal_lm(family, vocab_size=vocab_size, seed=seed)
    return prepare_model(model.to(dtype) if dtype is not None else model, tokenizer=None, name=f"tiny-{family}")


def tiny_causal_lm(family: str, vocab_size: int = 128, seed: int = 0):
    """A tiny random *ForCausalLM (float32, eval mode) of a supported family."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, vocab_size))
    return model.eval()


def tiny_gpt2():
    """A tiny random GPT-2: an architecture the FAM engine does not support."""
    import transformers

    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100))


def save_tiny_llama_dir(directory: Path) -> Path:
    """A tiny random Llama with the bundled tokenizer, saved as a model directory for ``--model``."""
    import torch
    import transformers

    tokenizer = bundled_tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), **TINY_DIMS)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_tiny_gpt2_dir(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tiny_gpt2().save_pretrained(directory)
    return directory


# -- documents ------------------------------------------------------------------------------------
def long_text(paragraphs: int = 40) -> str:
    """Deterministic English-like text, a few thousand tokens long."""
    topics = ["memory", "attention", "blocks", "feedback", "windows", "tokens", "layers", "states"]
    lines = []
    for i in range(paragraphs):
        topic = topics[i % len(topics)]
        lines.append(
            f"Paragraph {i}: the model reads {topic} one block at a time, and keeps a small working "
            f"memory of {i * 7 % 64} slots that it updates after every block of {topic}. "
            f"Nothing here is meant to make sense; it only has to tokenize into many tokens.\n"
        )
    return "\n".join(lines)


# -- running the CLI ------------------------------------------------------------------------------
def cli_env() -> dict:
    """Environment for CLI subprocesses: offline, as nothing here needs the Hub."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1")
    return env


def run_cli(args, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m famviz ARGS`` in a subprocess, from the repository root, text output captured."""
    return subprocess.run(
        [sys.executable, "-m", "famviz", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=cli_env(),
        timeout=timeout,
    )


def run_cli_in_process(args, capfd) -> tuple[int, str, str]:
    """``famviz.cli.main(ARGS)`` in this process: (exit status, stdout, stderr).

    Much faster than a subprocess (no second torch/transformers import); an exception escaping
    ``main`` is what the real CLI would print as a traceback, so it fails the test.
    """
    from famviz.cli import main

    capfd.readouterr()  # drop anything earlier
    try:
        status = main([str(a) for a in args])
    except SystemExit as exc:  # argparse errors
        status = exc.code
    except BaseException as exc:  # noqa: BLE001
        out, err = capfd.readouterr()
        pytest.fail(
            f"famviz.cli.main{tuple(map(str, args))} raised {type(exc).__name__}: {exc} -- "
            f"the CLI would print a traceback (stderr so far: {err!r})"
        )
    out, err = capfd.readouterr()
    return status, out, err


def assert_one_line_error(status, stdout: str, stderr: str, *, contains: tuple[str, ...] = ()) -> str:
    """The CLI's error contract: non-zero exit, empty stdout, exactly one non-empty stderr line, no traceback."""
    assert status not in (0, None), f"expected a non-zero exit, got {status}; stdout={stdout!r}"
    assert stdout == "", f"stdout must be empty on error, got {stdout!r}"
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)}: {stderr!r}"
    for text in contains:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    return lines[0]


def write_random_lora_adapter(directory: Path, fam_len: int = 4, block_size: int = 32, mem_blocks: int = 0):
    """(model dir, adapter dir): a saved tiny llama and an adapter for it whose LoRA is random (not zero)
    and whose FAM prompt is random, so results with and without it differ."""
    import torch

    from famviz import FamConfig
    from famviz.io.adapters import write_adapter
    from famviz.io.models import load_model
    from famviz.training.loop import add_lora

    model_dir = save_tiny_llama_dir(directory / "tiny")
    trained = load_model(str(model_dir), device="cpu", dtype="float32")
    peft_model = add_lora(trained, rank=2, alpha=None)
    torch.manual_seed(0)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    geometry = FamConfig("fam", block_size, fam_len, mem_blocks)
    adapter_dir = write_adapter(
        directory / "adapter", trained, geometry, torch.randn(fam_len, trained.config.hidden_size), peft_model
    )
    return model_dir, adapter_dir


def tiny_train_config(tmp_path, **overrides):
    """A TrainConfig for the tiny test models: 8-token blocks, FAM 4, 4 steps, on the CPU."""
    from famviz.training.config import TrainConfig

    values = dict(
        out=str(tmp_path / "run"),
        mode="fam",
        block_size=8,
        fam_len=4,
        mem_blocks=0,
        steps=4,
        lr=1e-2,
        warmup_steps=1,
        lora_rank=4,
        eval_every=0,
        checkpoint_every=2,
        seed=3,
        device="cpu",
    )
    values.update(overrides)
    return TrainConfig(**values)


def make_pdf(*page_streams: bytes) -> bytes:
    """A minimal valid PDF, one page per content stream, with Helvetica as font /F1.

    Written by hand because pypdf cannot lay out text; the xref offsets are computed here so
    the file parses without pypdf's repair path.
    """
    page_count = len(page_streams)
    first_page = 4  # objects: 1 catalog, 2 pages, 3 font, then (page, contents) pairs
    page_ids = [first_page + 2 * index for index in range(page_count)]
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [%s] /Count %d >>"
        % (b" ".join(b"%d 0 R" % page_id for page_id in page_ids), page_count),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    ]
    for page_id, stream in zip(page_ids, page_streams, strict=True):
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            b"/Resources << /Font << /F1 3 0 R >> >> /Contents %d 0 R >>" % (page_id + 1)
        )
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))

    pdf = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(pdf))
        pdf += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref_offset = len(pdf)
    pdf += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        pdf += b"%010d 00000 n \n" % offset
    pdf += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref_offset,
    )
    return bytes(pdf)


def text_stream(text: str) -> bytes:
    return b"BT /F1 12 Tf 72 712 Td (%s) Tj ET" % text.encode("latin-1")


class KeyRecall:
    """A miniature PassKey: a key token, filler, a question token, then the key again (loss on it only)."""

    def __init__(self, length: int = 20, answer: int | None = None, vocab_size: int = 128):
        self.length, self.vocab_size = length, vocab_size
        self.answer = answer  # a fixed answer token instead of the key: quick to learn

    def draw(self, rng):  # -> famviz.training.data.Example
        from famviz.training.data import Example

        key = rng.randrange(10, 20)
        filler = [rng.randrange(30, self.vocab_size) for _ in range(self.length - 3)]
        ids = [1, key] + filler + [2, key if self.answer is None else self.answer]
        return Example("passkey", ids, [0.0] * (len(ids) - 1) + [1.0])
