"""Shared fixtures: tiny random models of each supported family, and the real bundled model."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Training and evaluation set torch's thread count for the process (--threads); a test that runs them in
    this process must not change what later tests compute (bf16 results depend on the thread count)."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=97,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
)


def tiny_model(family: str, seed: int = 0):
    """A random float32 causal LM of ``family`` with 3 layers and GQA (4 heads, 2 KV heads)."""
    import transformers

    torch.manual_seed(seed)
    if family == "llama":
        config = transformers.LlamaConfig(**TINY)
    elif family == "mistral":
        config = transformers.MistralConfig(**TINY, sliding_window=None)
    elif family == "qwen2":
        config = transformers.Qwen2Config(**TINY, use_sliding_window=False)
    elif family == "qwen3":
        config = transformers.Qwen3Config(**TINY, head_dim=16, use_sliding_window=False)
    else:
        raise ValueError(family)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # larger-than-default weights make attention patterns sharp, so mask errors show
        for name, param in model.named_parameters():
            if name.endswith("proj.weight"):
                param.mul_(4.0)
    return model


FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_family(request):
    from famviz import prepare_model

    return prepare_model(tiny_model(request.param), tokenizer=None, name=f"tiny-{request.param}")


@pytest.fixture(scope="session")
def tiny_llama():
    from famviz import prepare_model

    return prepare_model(tiny_model("llama"), tokenizer=None, name="tiny-llama")


@pytest.fixture(scope="session")
def bundled_fp32():
    from famviz import load_model

    return load_model(dtype="float32")


@pytest.fixture(scope="session")
def bundled_fast():
    """The bundled model in the dtype ``auto`` picks here: bfloat16 where the CPU (or GPU) computes it, float32
    where the CPU only emulates it (several times slower: the suite would not fit CI's time)."""
    from famviz import load_model

    return load_model(dtype="auto")


@pytest.fixture(scope="session")
def gpl_text() -> str:
    with open("/usr/share/common-licenses/GPL-3", encoding="utf-8") as handle:
        return handle.read()
