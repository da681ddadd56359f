"""Tests for famviz.core.model and famviz.io.models: families, device/dtype choice, the bundled model's cache."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SUPPORTED_FAMILIES, bundled_tokenizer, tiny_causal_lm, tiny_gpt2

import famviz
import famviz.core.model as core_model
import famviz.io.models as models
from famviz.errors import FamvizError, UnsupportedModelError

CACHE_NAME = "smollm2-135m-instruct-f32"


# -- supported families ---------------------------------------------------------------------------
def test_supported_families_are_the_documented_ones():
    assert set(core_model.ARCHITECTURES) == set(SUPPORTED_FAMILIES)
    assert core_model.supported_families() == "llama, mistral, qwen2, qwen3"


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_check_supported_accepts_tiny_models(family):
    model = tiny_causal_lm(family)
    assert model.config.model_type == family
    spec = core_model.check_supported(model)
    assert spec is core_model.ARCHITECTURES[family]
    assert spec.qk_norm == (family == "qwen3")


def test_tiny_mistral_has_no_sliding_window():
    assert tiny_causal_lm("mistral").config.sliding_window is None


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_prepare_model_wraps_tiny_models(family):
    model = tiny_causal_lm(family).train()
    loaded = core_model.prepare_model(model, tokenizer=None, name=f"tiny-{family}")
    assert isinstance(loaded, famviz.LoadedModel)
    assert loaded.model is model and loaded.name == f"tiny-{family}"
    assert loaded.arch is core_model.ARCHITECTURES[family]
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    assert loaded.config is model.config


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_full_mode_of_accepted_models_matches_their_own_forward(family):
    """Accepting a family means the engine really runs it: full mode gives the model's own NLL."""
    model = tiny_causal_lm(family)
    loaded = core_model.prepare_model(model, tokenizer=None, name=family)
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    result = famviz.Stream(loaded, famviz.FamConfig(mode="full", block_size=16), record=False).run(ids[0].tolist())
    with torch.no_grad():
        logits = model(ids).logits.float()
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none").numpy()
    assert result.tokens == 40 and result.blocks == 3
    assert np.isnan(result.nll[0])
    np.testing.assert_allclose(result.nll[1:], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_fam_mode_runs_on_accepted_models(family):
    loaded = core_model.prepare_model(tiny_causal_lm(family), tokenizer=None, name=family)
    config = famviz.FamConfig(mode="fam", block_size=8, fam_len=4, mem_blocks=1)
    result = famviz.Stream(loaded, config, record=False).run(list(range(3, 23)))
    assert (result.tokens, result.blocks) == (20, 3)
    assert np.isfinite(result.nll[1:]).all()


def _assert_names_families(message: str) -> None:
    for family in SUPPORTED_FAMILIES:
        assert family in message, f"{family!r} not named in {message!r}"


def test_check_supported_refuses_gpt2():
    with pytest.raises(UnsupportedModelError) as info:
        core_model.check_supported(tiny_gpt2())
    assert isinstance(info.value, FamvizError)  # the CLI turns it into one line
    assert "gpt2" in str(info.value)
    _assert_names_families(str(info.value))


def test_prepare_model_refuses_gpt2():
    with pytest.raises(UnsupportedModelError) as info:
        core_model.prepare_model(tiny_gpt2(), tokenizer=None, name="tiny-gpt2")
    _assert_names_families(str(info.value))


def test_check_supported_refuses_an_unexpected_layer_layout():
    model = tiny_causal_lm("llama")
    del model.model.layers[0].post_attention_layernorm
    with pytest.raises(UnsupportedModelError, match="post_attention_layernorm"):
        core_model.check_supported(model)


def test_qwen3_needs_its_qk_norms():
    model = tiny_causal_lm("qwen3")
    del model.model.layers[0].self_attn.q_norm
    with pytest.raises(UnsupportedModelError, match="q_norm"):
        core_model.check_supported(model)


def test_load_model_refuses_gpt2_directory(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError) as info:
        models.load_model(str(tmp_path), device="cpu")
    assert "gpt2" in str(info.value)
    _assert_names_families(str(info.value))


def test_load_model_missing_path_is_one_clear_line(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(UnsupportedModelError) as info:
        models.load_model(str(missing), device="cpu")
    message = str(info.value)
    assert "no-such-model" in message and "\n" not in message


@pytest.mark.parametrize("dtype, expected", [("auto", None), ("float32", torch.float32)])
def test_load_model_tiny_directory(tmp_path, dtype, expected):
    expected = expected or models.resolve_dtype("auto", torch.device("cpu"))
    model = tiny_causal_lm("qwen2")
    model.save_pretrained(tmp_path)
    bundled_tokenizer().save_pretrained(tmp_path)
    loaded = models.load_model(str(tmp_path), device="cpu", dtype=dtype)
    assert loaded.config.model_type == "qwen2"
    assert loaded.dtype == expected
    assert loaded.arch is core_model.ARCHITECTURES["qwen2"]
    assert loaded.name == str(tmp_path)
    assert not loaded.model.training


# -- device and dtype -----------------------------------------------------------------------------
@pytest.mark.parametrize("native", [True, False], ids=["bf16-cpu", "emulating-cpu"])
def test_resolve_dtype(monkeypatch, native):
    monkeypatch.setattr(models, "cpu_computes_bfloat16", lambda: native)
    on_cpu = torch.bfloat16 if native else torch.float32  # emulated bfloat16 is several times slower
    assert models.resolve_dtype("auto") == on_cpu
    assert models.resolve_dtype("auto", torch.device("cpu")) == on_cpu
    assert models.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert models.resolve_dtype("bfloat16") == torch.bfloat16  # asked for by name: given, whatever the CPU
    assert models.resolve_dtype("float32") == torch.float32
    assert models.resolve_dtype(torch.float32) == torch.float32


def test_cpu_bfloat16_probe_agrees_with_the_cpus_own_flags():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to compare with")
    lines = [line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")]
    flags = set(lines[0].split(":", 1)[1].split()) if lines else set()
    if not any(flag.startswith("avx512") for flag in flags):
        assert models.cpu_computes_bfloat16() is False  # AVX2 only: PyTorch would emulate bfloat16
    if flags & {"avx512_bf16", "amx_bf16"}:
        assert models.cpu_computes_bfloat16() is True


@pytest.mark.parametrize(("capability", "expected"), [("AVX512", True), ("AVX2", False), ("DEFAULT", False)])
def test_without_onednn_bfloat16_is_judged_by_the_vector_extension(monkeypatch, capability, expected):
    def no_onednn():
        raise RuntimeError("built without oneDNN")

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", no_onednn)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert models.cpu_computes_bfloat16.__wrapped__() is expected  # the cached answer is this CPU's


@pytest.mark.parametrize("native", [True, False], ids=["bf16-cpu", "emulating-cpu"])
def test_bfloat16_on_a_cpu_that_emulates_it_is_warned_about(monkeypatch, caplog, native):
    monkeypatch.setattr(models, "cpu_computes_bfloat16", lambda: native)
    with caplog.at_level("WARNING", logger="famviz"):
        models.warn_if_emulated(torch.bfloat16, torch.device("cpu"))
        models.warn_if_emulated(torch.float32, torch.device("cpu"))
        models.warn_if_emulated(torch.bfloat16, torch.device("cuda"))
    warnings = [r.getMessage() for r in caplog.records]
    if native:
        assert warnings == []
    else:
        assert len(warnings) == 1 and "emulates" in warnings[0] and "float32" in warnings[0]
    if not torch.cuda.is_available():  # the app's note speaks of the default device
        assert models.auto_dtype_note().startswith("auto = bfloat16" if native else "auto = float32")


@pytest.mark.parametrize("dtype", ["int8", "float64", "", "BFLOAT16 "])
def test_resolve_dtype_refuses_unknown(dtype):
    with pytest.raises(UnsupportedModelError) as info:
        models.resolve_dtype(dtype)
    assert repr(dtype) in str(info.value)
    assert "bfloat16" in str(info.value) and "float32" in str(info.value)


def test_load_model_refuses_unknown_dtype_before_loading():
    with pytest.raises(UnsupportedModelError, match="int8"):
        models.load_model("/no/such/model", dtype="int8")


def test_resolve_device_here():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert models.resolve_device("auto").type == expected
    assert models.resolve_device("cpu") == torch.device("cpu")


def test_resolve_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.resolve_device("auto") == torch.device("cpu")
    for device in ("cuda", "cuda:0"):
        with pytest.raises(UnsupportedModelError) as info:
            models.resolve_device(device)
        assert "CUDA" in str(info.value) and "\n" not in str(info.value)


def test_resolve_device_auto_picks_cuda_when_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert models.resolve_device("auto") == torch.device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is available here")
def test_load_model_cuda_without_gpu_fails_before_loading():
    with pytest.raises(UnsupportedModelError, match="CUDA"):
        models.load_model("/no/such/model", device="cuda")


# -- cache location -------------------------------------------------------------------------------
def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("FAMVIZ_CACHE_DIR", str(tmp_path / "famviz-cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "famviz-cache"
    monkeypatch.delenv("FAMVIZ_CACHE_DIR")
    assert models.cache_dir() == tmp_path / "xdg" / "famviz"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_dir() == tmp_path / "home" / ".cache" / "famviz"


# -- cache integrity (manifest) without conversion cost ------------------------------------------
KEY = "SmolLM2-135M-Instruct.Q4_1.gguf:12345"


@pytest.fixture
def cached_dir(tmp_path) -> Path:
    """A small stand-in for the cache folder: one file larger than the digest's sampling, two small ones."""
    directory = tmp_path / CACHE_NAME
    directory.mkdir()
    rng = np.random.default_rng(0)
    (directory / "model.safetensors").write_bytes(rng.integers(0, 256, 3 * (1 << 20), dtype=np.uint8).tobytes())
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 30}))
    (directory / "tokenizer.json").write_text('{"version": "1.0"}' * 100)
    models._write_manifest(directory, KEY)
    return directory


def test_manifest_ok_after_writing(cached_dir):
    assert (cached_dir / models.MANIFEST).is_file()
    manifest = json.loads((cached_dir / models.MANIFEST).read_text())
    assert manifest["source"] == KEY
    assert set(manifest["files"]) == {"model.safetensors", "config.json", "tokenizer.json"}
    assert models._manifest_ok(cached_dir, KEY)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_manifest_detects_truncation(cached_dir, name):
    path = cached_dir / name
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    assert not models._manifest_ok(cached_dir, KEY)


def test_manifest_detects_truncation_by_one_byte(cached_dir):
    path = cached_dir / "model.safetensors"
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 1)
    assert not models._manifest_ok(cached_dir, KEY)


@pytest.mark.parametrize(
    "name, where", [("config.json", 5), ("tokenizer.json", -1), ("model.safetensors", 0), ("model.safetensors", -1)]
)
def test_manifest_detects_flipped_bytes(cached_dir, name, where):
    path = cached_dir / name
    data = bytearray(path.read_bytes())
    for offset in (where, where + 1) if where >= 0 else (-2, -1):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    assert not models._manifest_ok(cached_dir, KEY)


def test_manifest_missing(cached_dir):
    (cached_dir / models.MANIFEST).unlink()
    assert not models._manifest_ok(cached_dir, KEY)


def test_manifest_other_source_key(cached_dir):
    assert not models._manifest_ok(cached_dir, "SmolLM2-135M-Instruct.Q4_1.gguf:99999")
    assert not models._manifest_ok(cached_dir, "")


def test_manifest_detects_a_deleted_file(cached_dir):
    (cached_dir / "tokenizer.json").unlink()
    assert not models._manifest_ok(cached_dir, KEY)


@pytest.mark.parametrize(
    "content",
    [
        "",
        "not json",
        '{"source": "x"}',
        '{"files": {}}',
        json.dumps({"source": KEY}),
        json.dumps({"source": KEY, "files": {"gone.bin": "0"}}),
        pytest.param("[]", id="list"),
        pytest.param("null", id="null"),
        pytest.param(json.dumps({"source": KEY, "files": None}), id="files-null"),
    ],
)
def test_manifest_malformed(cached_dir, content):
    (cached_dir / models.MANIFEST).write_text(content)
    assert not models._manifest_ok(cached_dir, KEY)


def test_manifest_of_missing_directory(tmp_path):
    assert not models._manifest_ok(tmp_path / "nothing-here", KEY)


# -- the real bundled model -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_cache_dir() -> Path:
    """The real cached bundled model (converted once, ~26 s, if it is not cached yet)."""
    return models.bundled_model_dir()


@pytest.mark.integration
def test_load_bundled_model(real_cache_dir):
    started = time.perf_counter()
    loaded = famviz.load_model()
    seconds = time.perf_counter() - started
    print(f"cached bundled model loaded in {seconds:.2f} s ({loaded.dtype})")
    assert loaded.config.model_type == "llama"
    assert loaded.config.num_hidden_layers == 30
    assert len(loaded.model.model.layers) == 30
    assert loaded.dtype == models.resolve_dtype("auto", loaded.device)
    assert loaded.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert loaded.name == models.BUNDLED_NAME
    assert loaded.arch is core_model.ARCHITECTURES["llama"]
    assert len(loaded.tokenizer) == loaded.config.vocab_size == 49152


@pytest.mark.integration
def test_load_bundled_model_float32(real_cache_dir):
    started = time.perf_counter()
    loaded = famviz.load_model(dtype="float32", device="cpu")
    print(f"cached bundled model loaded in {time.perf_counter() - started:.2f} s (float32)")
    assert loaded.dtype == torch.float32
    assert loaded.config.model_type == "llama"
    assert len(loaded.model.model.layers) == 30


@pytest.mark.slow
@pytest.mark.integration
def test_corrupt_cache_is_rebuilt(real_cache_dir, tmp_path, monkeypatch, caplog):
    source_key = f"{models.BUNDLED_GGUF}:{models.bundled_gguf_path().stat().st_size}"
    assert models._manifest_ok(real_cache_dir, source_key)
    original_size = (real_cache_dir / "model.safetensors").stat().st_size

    monkeypatch.setenv("FAMVIZ_CACHE_DIR", str(tmp_path))
    target = tmp_path / CACHE_NAME
    shutil.copytree(real_cache_dir, target)  # a real copy: never touch the user's cache
    weights = target / "model.safetensors"
    assert os.stat(weights).st_ino != os.stat(real_cache_dir / "model.safetensors").st_ino
    with open(weights, "r+b") as handle:
        handle.truncate(original_size // 2)
    assert not models._manifest_ok(target, source_key)

    started = time.perf_counter()
    with caplog.at_level("WARNING", logger="famviz"):
        rebuilt = models.bundled_model_dir()
    print(f"rebuilt the corrupt cache in {time.perf_counter() - started:.1f} s")
    assert rebuilt == target
    assert any("rebuilding" in record.getMessage() for record in caplog.records)
    assert weights.stat().st_size == original_size
    assert models._manifest_ok(target, source_key)
    assert not list(tmp_path.glob(".convert-*")), "staging folder left behind"
    assert models._manifest_ok(real_cache_dir, source_key)  # the real cache is untouched

    loaded = famviz.load_model(device="cpu")
    assert loaded.config.num_hidden_layers == 30

    inode, mtime = weights.stat().st_ino, weights.stat().st_mtime_ns
    started = time.perf_counter()
    assert models.bundled_model_dir() == target
    seconds = time.perf_counter() - started
    print(f"second bundled_model_dir(): {seconds:.3f} s")
    assert seconds < 2
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == (inode, mtime), "rebuilt again"
