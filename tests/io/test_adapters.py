"""Adapter directories: what training writes is what ``--adapter`` reads, exactly; mismatches are refused."""

from __future__ import annotations

import json
import random
import warnings

import pytest
import torch
from helpers import KeyRecall, tiny_loaded

from famviz import FamConfig, FamModel, prepare_model
from famviz.errors import AdapterError
from famviz.io.adapters import (
    ADAPTER_META,
    apply_adapter,
    read_adapter,
    read_training_card,
    write_adapter,
    write_training_card,
)
from famviz.training.config import TrainConfig
from famviz.training.loop import Trainer

VOCAB = 128


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny FAM run of 3 steps, written as an adapter directory."""
    out = tmp_path_factory.mktemp("adapter") / "run"
    config = TrainConfig(
        out=str(out),
        mode="fam",
        block_size=8,
        fam_len=4,
        mem_blocks=0,
        steps=3,
        lr=1e-2,
        warmup_steps=1,
        lora_rank=4,
        eval_every=0,
        checkpoint_every=10,
        device="cpu",
    )
    trainer = Trainer(config, loaded=tiny_loaded(), data=KeyRecall())
    trainer.run(progress=False)
    return trainer, out


def test_round_trip_is_exact(trained):
    trainer, out = trained
    adapter = read_adapter(out)
    assert torch.equal(adapter.fam_prompt, trainer.prompt.detach().cpu())
    assert adapter.fam_config == {"mode": "fam", "block_size": 8, "fam_len": 4, "mem_blocks": 0}
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(str(out / "adapter_model.safetensors"))
    live = get_peft_model_state_dict(trainer.peft_model)
    assert saved.keys() == live.keys() and all(torch.equal(saved[k], live[k]) for k in saved)
    # LoRA on top of the layers actually moved away from zero (B starts at zero): something was saved.
    assert any(k.endswith("lora_B.weight") and saved[k].abs().sum() > 0 for k in saved)


def test_applied_adapter_reproduces_the_trained_model(trained):
    trainer, out = trained
    config = FamConfig(mode="fam", block_size=8, fam_len=4, mem_blocks=0)
    ids = torch.tensor([KeyRecall(24).draw(random.Random(5)).ids])
    with torch.no_grad():
        trainer.peft_model.eval()
        reference = FamModel(trainer.loaded, config, fam_prompt=trainer.prompt.detach())
        expected = _stream_hidden(reference, ids)
        fresh = tiny_loaded()  # the same random base model, never trained
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prompt = apply_adapter(out, fresh, config)
        got = _stream_hidden(FamModel(fresh, config, fam_prompt=prompt), ids)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]  # nothing a user can act on
    assert torch.equal(prompt, trainer.prompt.detach())
    assert torch.allclose(got, expected, atol=1e-5)  # LoRA merged into the weights: equal up to rounding
    plain = _stream_hidden(FamModel(tiny_loaded(), config), ids)
    assert not torch.allclose(plain, expected, atol=1e-3)  # and the adapter does change the model


def _stream_hidden(model: FamModel, ids: torch.Tensor) -> torch.Tensor:
    state, outs = model.initial_state(1), []
    for start in range(0, ids.shape[1], model.config.block_size):
        out = model.forward_block(ids[:, start : start + model.config.block_size], state)
        state = out.state
        outs.append(out.hidden)
    return torch.cat(outs, dim=1)


def test_lora_stored_in_half_precision_applies_nearly_the_same(trained, tmp_path):
    """--adapter-dtype float16 halves the file; merged into a float32 model it gives nearly the same outputs."""
    from safetensors.torch import load_file

    trainer, out = trained
    config = FamConfig(mode="fam", block_size=8, fam_len=4, mem_blocks=0)
    half = write_adapter(
        tmp_path / "half", trainer.loaded, config, trainer.prompt, trainer.peft_model, lora_dtype=torch.float16
    )
    stored = load_file(str(half / "adapter_model.safetensors"))
    assert stored and all(t.dtype == torch.float16 for t in stored.values())
    ids = torch.tensor([KeyRecall(24).draw(random.Random(5)).ids])
    with torch.no_grad():
        outputs = []
        for directory in (out, half):
            fresh = tiny_loaded()
            prompt = apply_adapter(directory, fresh, config)
            outputs.append(_stream_hidden(FamModel(fresh, config, fam_prompt=prompt), ids))
    assert outputs[0].dtype == outputs[1].dtype == torch.float32
    torch.testing.assert_close(outputs[1], outputs[0], atol=2e-3, rtol=2e-3)


def test_adapter_for_another_model_is_refused(trained):
    _, out = trained
    config = FamConfig(mode="fam", block_size=8, fam_len=4, mem_blocks=0)
    import transformers

    wide = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=96,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    other = prepare_model(transformers.AutoModelForCausalLM.from_config(wide).eval(), tokenizer=None, name="wide")
    with pytest.raises(AdapterError, match="hidden_size"):
        apply_adapter(out, other, config)
    with pytest.raises(AdapterError, match="model_type"):
        apply_adapter(out, tiny_loaded("qwen2"), config)


def test_adapter_for_another_fam_length_is_refused_in_the_users_words(trained):
    _, out = trained
    with pytest.raises(AdapterError, match="memory has 4 slots, so the FAM length must be 4") as refused:
        apply_adapter(out, tiny_loaded(), FamConfig(mode="fam", block_size=8, fam_len=8, mem_blocks=0))
    message = str(refused.value)
    assert str(out.parent) not in message and "fam_len" not in message  # no server path, no internal name


def test_damaged_or_foreign_directories_are_refused(tmp_path):
    with pytest.raises(AdapterError, match="not a famviz adapter"):
        read_adapter(tmp_path)
    (tmp_path / ADAPTER_META).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(AdapterError):
        read_adapter(tmp_path)


def test_write_refuses_a_prompt_of_the_wrong_shape(tmp_path):
    loaded = tiny_loaded()
    with pytest.raises(AdapterError):
        write_adapter(tmp_path, loaded, FamConfig(mode="fam", block_size=8, fam_len=4), torch.zeros(5, 64))


def test_training_card_is_written_twice(tmp_path):
    card = {"command": "python -m famviz train --out x", "steps": 7, "fam": {"block_size": 8}, "evaluation": {"a": 1}}
    write_training_card(tmp_path, card)
    assert read_training_card(tmp_path) == card
    markdown = (tmp_path / "TRAINING_CARD.md").read_text()
    assert "python -m famviz train --out x" in markdown and "Steps: 7" in markdown


def test_training_card_renders_evaluations_and_the_baseline_as_tables(tmp_path):
    cell = {
        "mode": "fam",
        "mem_blocks": 0,
        "length": 2048,
        "depth": 0.0,
        "trials": 50,
        "accuracy": 0.06,
        "mean_key_logprob": -8.13,
    }
    result = {
        "passkey": [cell],
        "dtype": "bfloat16",
        "passkey_scoring": "greedy",
        "in_window_nll": {
            "tuned": 3.2,
            "untuned_full_attention": 3.35,
            "untuned_same_mode": 4.16,
            "relative_change": 3.2 / 3.35 - 1,
            "windows": 8,
            "window_tokens": 256,
            "text": "GPL-3",
        },
    }
    card = {
        "steps": 9,
        "evaluation": {"fam_mem0_block256": result, "summary": "Result: SHORTFALL."},
        "baseline": {
            "mode": "bswa",
            "command": "python -m famviz train --mode bswa",
            "steps": 9,
            "evaluation": {"bswa_mem0_block256": dict(result, passkey=[dict(cell, accuracy=0.0)])},
        },
    }
    write_training_card(tmp_path, card)
    markdown = (tmp_path / "TRAINING_CARD.md").read_text()
    assert "| 2048 | 0 | 50 | 6% | -8.13 |" in markdown and "| 2048 | 0 | 50 | 0% | -8.13 |" in markdown
    assert "tuned 3.2000, untuned full attention 3.3500 (-4.5%), untuned same mode 4.1600" in markdown
    assert "Baseline trained with the same budget: bswa" in markdown and "Result: SHORTFALL." in markdown
