"""FAM fine-tuning: LoRA + a learned initial FAM prompt (docs/algorithm.md §3, §5, §6).

``python -m famviz train --out DIR ...`` (or ``accelerate launch -m famviz train ...`` on several
GPUs) trains, per step, on whole sequences streamed block by block through ``FamModel``:

* LoRA (peft) on the attention and MLP projections; the FAM prompt trained in full; all else frozen.
* Backpropagation through every block of a sequence, with no stop-gradient on the FAM or on memory
  blocks; each layer is recomputed in backward (``FamModel.checkpoint_layers``) so memory stays
  bounded by one layer's activations per block.
* Random Position Offset (RPO): each sequence's RoPE positions are shifted by an offset drawn from
  U[0, 2π·rope_theta), zeroed with probability 0.5. The engine rebases positions to each window's
  start, so the offset is added to the rebased positions RoPE receives (``TrainingFamModel``).
* Random State Passing (RSP): the final FAM of batch element 0 (every layer, detached) is kept; the
  next step starts from it with probability p (0.8), else from the learned prompt's initial FAM.

``--mode bswa`` trains the BSWA baseline with the same data and budget (LoRA only, no FAM).
The output directory is an adapter directory (``famviz.io.adapters``) plus ``checkpoint/``,
``train_log.jsonl``, ``train.log`` and ``loss_curve.html``. ``--resume DIR`` continues a run with
its optimizer, step, data position and RNG states.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from famviz.core.config import FamConfig
from famviz.core.fam_model import FamModel, StreamState
from famviz.errors import ConfigError
from famviz.training.data import Example, ExampleStream, TextCorpus, parse_mixture, parse_range

log = logging.getLogger("famviz.training.train")

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHECKPOINT_DIR = "checkpoint"
TRAIN_CONFIG = "train_config.json"
LOG_FILE = "train_log.jsonl"


@dataclass
class TrainConfig:
    out: str
    model: str | None = None  # None = the bundled model
    mode: str = "fam"
    block_size: int = 256
    fam_len: int = 64
    mem_blocks: int = 0
    steps: int = 1000
    lr: float = 5e-4
    prompt_lr: float | None = None  # default: lr
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 1
    lora_rank: int = 16
    lora_alpha: float | None = None  # default: 2 × rank
    data: str = "passkey:0.8,copy:0.2"
    passkey_tokens: str = "256-2048"
    passkey_depth_zero: float = 0.5
    passkey_aligned: float = 0.0  # share of PassKey prompts whose answer starts in (or crosses into) a new block
    corpus: list[str] | None = None  # training text paths (famviz.io.corpus); None: the machine's text files
    copy_text_tokens: str = "768-1536"
    copy_len: int = 256
    copy_weight: float = 0.1
    text_weight: float = 0.0
    readout_weight: float = 0.0  # PassKey read-out probe after every block (weight of its answer; 0 = off)
    readout_split: float = 0.0  # share of steps whose probes cross a block boundary after the question
    curriculum: str | None = None  # e.g. "2,4,8,16": PassKey prompts of up to n blocks, n raised when held-out
    curriculum_threshold: float = 0.9  # ... accuracy at n blocks reaches this
    init_from: str | None = None  # start from an adapter directory's LoRA and prompt (fresh optimizer)
    rpo: bool = True
    rsp: bool = True
    rsp_prob: float = 0.8
    eval_every: int = 100
    eval_trials: int = 8
    eval_tokens: int = 1024
    checkpoint_every: int = 50
    max_minutes: float | None = None  # stop (checkpoint + adapter) after this wall time
    seed: int = 0
    checkpoint_layers: bool = True  # recompute each layer in backward (bounded memory; ~30% slower)
    threads: int | None = None  # torch CPU threads (None: torch's default)
    device: str = "auto"
    dtype: str = "float32"
    adapter_dtype: str | None = None  # LoRA weights in the written adapter (None: as trained); checkpoints keep full precision
    command: str = ""  # every invocation of the run, resumes included
    stage_command: str = ""  # this invocation alone (a stage of the training card)

    def fam_config(self) -> FamConfig:
        return FamConfig(mode=self.mode, block_size=self.block_size, fam_len=self.fam_len, mem_blocks=self.mem_blocks)

    def validate(self) -> None:
        if self.mode not in ("fam", "bswa"):
            raise ConfigError(f"training mode must be fam or bswa, got {self.mode!r}")
        if self.adapter_dtype not in (None, "float32", "float16", "bfloat16"):
            raise ConfigError(f"--adapter-dtype must be float32, float16 or bfloat16, got {self.adapter_dtype!r}")
        self.fam_config()
        for name in ("steps", "batch_size", "lora_rank", "copy_len", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not 0 <= self.rsp_prob <= 1:
            raise ConfigError(f"--rsp-prob must be within 0…1, got {self.rsp_prob}")
        if not 0 <= self.passkey_aligned <= 1:
            raise ConfigError(f"--passkey-aligned must be within 0…1, got {self.passkey_aligned}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        parse_mixture(self.data)
        if self.corpus and "copy" not in parse_mixture(self.data):
            raise ConfigError("--corpus is the text of copy examples: add copy to --data (e.g. --data passkey:0.5,copy:0.5)")
        self.curriculum_stages()
        if self.readout_weight < 0:
            raise ConfigError(f"--readout-weight must be 0 or more, got {self.readout_weight}")
        if not 0 <= self.readout_split <= 1:
            raise ConfigError(f"--readout-split must be within 0…1, got {self.readout_split}")
        parse_range(self.passkey_tokens, "--passkey-tokens")
        parse_range(self.copy_text_tokens, "--copy-text-tokens")

    def curriculum_stages(self) -> list[int]:
        """The curriculum's PassKey lengths in blocks (empty without a curriculum)."""
        if not self.curriculum:
            return []
        try:
            stages = [int(x) for x in self.curriculum.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--curriculum must be block counts like 2,4,8,16, got {self.curriculum!r}") from None
        if not stages or any(n <= 0 for n in stages) or stages != sorted(stages):
            raise ConfigError(f"--curriculum must be increasing positive block counts, got {self.curriculum!r}")
        return stages

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# -- the model being trained -----------------------------------------------------------------------
class TrainingFamModel(FamModel):
    """FamModel with a per-example RoPE position offset (RPO) added to the positions RoPE receives.

    The engine rebases each window's positions to its start; RPO shifts those rebased positions of
    every query and key of a sequence by the same offset, so attention scores are equal in exact
    arithmetic but the model sees the rotations (and rounding) of large positions.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.position_offsets: torch.Tensor | None = None  # (batch,) float, or None

    def _window_angles(self, position: int, m: int, f: int, n: int):
        if self.position_offsets is None:
            return super()._window_angles(position, m, f, n)
        if self.memory_capacity is None:
            rows, memory = torch.arange(position - f, position + n), None
        else:
            start = position - max(m, f)
            rows = torch.cat([torch.arange(position - f, position), torch.arange(position, position + n)]) - start
            memory = torch.arange(position - m, position) - start
        cos_r, sin_r = self._offset_rope(rows)
        if memory is None:
            return cos_r, sin_r, None, None
        cos_m, sin_m = self._offset_rope(memory)
        return cos_r, sin_r, cos_m, sin_m

    def _offset_rope(self, positions: torch.Tensor):
        offsets = self.position_offsets.to(device=self.device, dtype=torch.float64)
        shifted = positions.to(device=self.device, dtype=torch.float64).unsqueeze(0) + offsets.unsqueeze(1)
        probe = torch.empty(0, device=self.device, dtype=self.dtype)
        cos, sin = self.decoder.rotary_emb(probe, shifted.float())  # (batch, P, head_dim), fp32 angles
        return cos.unsqueeze(1), sin.unsqueeze(1)


def rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta or getattr(config, "rope_theta", 10000.0))


def draw_position_offsets(rng: random.Random, batch: int, theta: float) -> torch.Tensor:
    """RPO offsets per example: U[0, 2π·theta), zeroed with probability 0.5 (docs/algorithm.md §4)."""
    return torch.tensor([0.0 if rng.random() < 0.5 else rng.uniform(0.0, 2 * math.pi * theta) for _ in range(batch)],
                        dtype=torch.float64)


class StatePassing:
    """Random State Passing (docs/algorithm.md §5): reuse batch element 0's final FAM with probability p."""

    def __init__(self, prob: float):
        self.prob = prob
        self.saved: tuple[torch.Tensor, ...] | None = None

    def choose(self, rng: random.Random) -> tuple[torch.Tensor, ...] | None:
        """The FAM to start from (None = the learned initial FAM). Always draws, so RNG use is fixed."""
        use = rng.random() < self.prob
        return self.saved if use and self.saved is not None else None

    def remember(self, final_fam: tuple[torch.Tensor, ...]) -> None:
        self.saved = tuple(f[:1].detach().clone() for f in final_fam)


def resumed_stage(history: list[dict], stages: list[int]) -> int:
    """The curriculum stage a resumed run continues at: after the last evaluation's stage (and its advance)."""
    records = [r for r in history if "curriculum_blocks" in r]
    if not stages or not records:
        return 0
    last = records[-1]
    reached = last["curriculum_blocks"] if not last.get("advanced") else last["curriculum_blocks"] + 1
    return next((i for i, n in enumerate(stages) if n >= reached), len(stages) - 1)


def add_lora(loaded, rank: int, alpha: float | None):
    """Wrap ``loaded.model`` with peft LoRA on the attention and MLP projections (modules patched in place)."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in loaded.model.named_modules()}
    targets = [t for t in LORA_TARGETS if t in present]
    lora = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=0.0,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(loaded.model, lora)


def initial_training_state(fam_model: FamModel, batch: int, prompt: torch.Tensor | None,
                           passed: tuple[torch.Tensor, ...] | None) -> StreamState:
    """The state a training sequence starts from: the FAM prompt run up the stack (differentiable,
    recomputed every step since the prompt changes) or a FAM passed on from the previous step."""
    empty = torch.zeros(batch, fam_model.n_kv_heads, 0, fam_model.head_dim, device=fam_model.device, dtype=fam_model.dtype)
    n_layers = len(fam_model.layers)
    if not fam_model.fam_len:
        fam, fresh = (), True
    elif passed is not None:
        fam, fresh = tuple(f.expand(batch, -1, -1) for f in passed), False
    else:
        fam, fresh = tuple(f.expand(batch, -1, -1) for f in fam_model.run_prompt_up_the_stack(prompt)), True
    return StreamState(position=0, fam=fam, fam_fresh=fresh, mem_k=(empty,) * n_layers, mem_v=(empty,) * n_layers,
                       last_logits=None)


def weighted_predictions(fam_model: FamModel, ids: torch.Tensor, weights: torch.Tensor, state: StreamState,
                         skip_unseen: bool = True):
    """Stream whole sequences block by block; per block, yield the next state and, when any prediction in
    the block is weighted, (float32 logits, targets, weights) of those predictions only.

    ``weights[b, i]`` weighs predicting ``ids[b, i]`` (position i-1 predicts token i).
    ``skip_unseen``: when blocks are independent (BSWA without memory), a block with no weighted
    prediction affects nothing and is not run (losses and gradients are identical).
    """
    block = fam_model.config.block_size
    target_mask = weights[:, 1:] > 0
    skip = skip_unseen and fam_model.blocks_independent
    for start in range(0, ids.shape[1], block):
        n = min(block, ids.shape[1] - start)
        mask = target_mask[:, start : start + n]
        mask = F.pad(mask, (0, n - mask.shape[1]))  # the last position of a sequence predicts nothing
        if skip and not mask.any():
            state = replace(state, position=state.position + n)
            yield state, None
            continue
        out = fam_model.forward_block(ids[:, start : start + block], state)
        state = out.state
        if not mask.any():
            yield state, None
            continue
        targets = ids[:, start + 1 : start + n + 1]
        w = weights[:, start + 1 : start + n + 1]
        targets = F.pad(targets, (0, n - targets.shape[1]))[mask]
        w = F.pad(w, (0, n - w.shape[1]))[mask]
        yield state, (fam_model.logits(out.hidden[mask]).float(), targets, w)


@dataclass
class ReadoutBatch:
    """The read-out probes of a batch (``training_data.Readout``), right-padded; rows without one never match."""

    ids: torch.Tensor  # (batch, P)
    weights: torch.Tensor  # (batch, P)
    first: torch.Tensor  # (batch,) long: block ends within [first, last] are probed
    last: torch.Tensor


def sequence_loss(fam_model: FamModel, ids: torch.Tensor, weights: torch.Tensor, state: StreamState,
                  skip_unseen: bool = True, readout: ReadoutBatch | None = None, readout_offset: int = 0,
                  parts: dict | None = None, readout_split: int = 0):
    """Weighted next-token loss of whole sequences streamed block by block, and the final state.

    With ``readout``, after every block whose end lies within a row's [first, last], the row's probe is
    run as a side block on the state there (``FamModel.read_block``, its rows at ``readout_offset`` in the
    block) and its weighted predictions join the loss; the stream itself is unchanged by it.
    ``readout_split`` > 0: each probe is asked across a block boundary instead, as at a round prompt
    length: its first ``readout_split`` tokens (the question, maybe the answer's start) run as a block of
    their own that updates the FAM, and the rest is read from that FAM alone at the start of the next
    block (``readout_offset`` is then unused).
    Returns (loss, final state, weighted token count): the loss is Σ w·nll / #(w > 0), probes included.
    ``parts``, when given, receives the mean weighted NLL of the stream's own predictions ("main") and of
    the probes ("readout") as floats (they are learned at different rates).
    """
    main_sum = torch.zeros((), device=fam_model.device)
    probe_sum = torch.zeros((), device=fam_model.device)
    main_count = int((weights[:, 1:] > 0).sum())
    probe_count = 0
    start = state.position
    for state, scored in weighted_predictions(fam_model, ids, weights, state, skip_unseen):  # noqa: B020 - each block's state replaces the one before
        if scored is not None:
            logits, targets, w = scored
            main_sum = main_sum + (F.cross_entropy(logits, targets, reduction="none") * w).sum()
        if readout is not None:
            end = state.position - start
            asked = (readout.first <= end) & (end <= readout.last)
            if asked.any():
                w = readout.weights[:, 1:] * asked.unsqueeze(1)
                mask = w > 0
                if readout_split:
                    asked_block = fam_model.forward_block(readout.ids[:, :readout_split], state)
                    rest = fam_model.read_block(readout.ids[:, readout_split:], asked_block.state)
                    hidden = torch.cat([asked_block.hidden, rest], dim=1)[:, :-1]
                else:
                    hidden = fam_model.read_block(readout.ids, state, readout_offset)[:, :-1]
                logits = fam_model.logits(hidden[mask]).float()
                nll = F.cross_entropy(logits, readout.ids[:, 1:][mask], reduction="none")
                probe_sum = probe_sum + (nll * w[mask]).sum()
                probe_count += int(mask.sum())
    if parts is not None:
        main_value, probe_value = float(main_sum.detach()), float(probe_sum.detach())
        parts["main"] = main_value / max(main_count, 1)
        parts["readout"] = probe_value / probe_count if probe_count else None
        parts.update(main_sum=main_value, main_count=main_count, probe_sum=probe_value, probe_count=probe_count)
    count = main_count + probe_count
    return (main_sum + probe_sum) / max(count, 1), state, count


def global_parts(accelerator, parts: dict) -> dict:
    """``sequence_loss``'s per-part mean losses over every process's tokens (the log's loss_main/loss_readout)."""
    keys = ("main_sum", "main_count", "probe_sum", "probe_count")
    totals = accelerator.reduce(torch.tensor([float(parts[k]) for k in keys], device=accelerator.device), reduction="sum")
    main_sum, main_count, probe_sum, probe_count = totals.tolist()
    return dict(parts, main=main_sum / max(main_count, 1.0), readout=probe_sum / probe_count if probe_count else None)


def collate(examples: list[Example], pad_id: int, device,
            length: int | None = None) -> tuple[torch.Tensor, torch.Tensor, ReadoutBatch | None]:
    """Right-pad a batch (pad tokens carry no loss and come after everything that does), and its probes;
    to ``length`` tokens when given (a process's slice is padded like the whole global batch)."""
    length = max(max(len(e.ids) for e in examples), length or 0)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    weights = torch.zeros(len(examples), length)
    for row, example in enumerate(examples):
        ids[row, : len(example.ids)] = torch.tensor(example.ids)
        weights[row, : len(example.weights)] = torch.tensor(example.weights)
    readout = None
    probes = [e.readout for e in examples]
    if any(p is not None for p in probes):
        width = max(len(p.ids) for p in probes if p is not None)
        readout = ReadoutBatch(ids=torch.full((len(examples), width), pad_id, dtype=torch.long),
                               weights=torch.zeros(len(examples), width),
                               first=torch.full((len(examples),), 1, dtype=torch.long),
                               last=torch.zeros(len(examples), dtype=torch.long))  # first > last: never asked
        for row, probe in enumerate(probes):
            if probe is not None:
                readout.ids[row, : len(probe.ids)] = torch.tensor(probe.ids)
                readout.weights[row, : len(probe.weights)] = torch.tensor(probe.weights)
                readout.first[row], readout.last[row] = probe.first, probe.last
        readout = ReadoutBatch(*(t.to(device) for t in (readout.ids, readout.weights, readout.first, readout.last)))
    return ids.to(device), weights.to(device), readout


# -- held-out evaluation ---------------------------------------------------------------------------
@torch.no_grad()
def passkey_teacher_forced(fam_model: FamModel, tokenizer, prompt: torch.Tensor | None, length: int, trials: int,
                           seed: int, depth: float = 0.0) -> dict:
    """Held-out PassKey prompts scored teacher-forced: a trial counts when every key token and the token
    that ends the number are the argmax (so a model that keeps writing digits fails, as greedy scoring does).

    Cheap enough to run during training; ``famviz.probes.passkey`` scores by greedy decoding for the report.
    """
    from famviz.probes.passkey import make_passkey_document

    hits, logprobs = 0, []
    for trial in range(trials):
        document = make_passkey_document(tokenizer, length, depth=depth, seed=seed + trial)
        answer = list(document.answer_ids) + list(document.closing_ids)
        start, key_end = len(document.token_ids), len(document.token_ids) + len(document.answer_ids)
        ids = torch.tensor([list(document.token_ids) + answer], device=fam_model.device)
        state = initial_training_state(fam_model, 1, prompt, None)
        weights = torch.zeros_like(ids, dtype=torch.float32)
        weights[0, start:] = 1.0
        hit, logprob = _score_tokens(fam_model, ids, weights, state)  # one entry per answer token
        correct, lp = bool(hit.all()), float(logprob[: key_end - start].sum())
        hits += int(correct)
        logprobs.append(lp)
    return {"length": length, "depth": depth, "trials": trials, "accuracy": hits / max(trials, 1),
            "key_logprob": sum(logprobs) / max(len(logprobs), 1)}


def _score_tokens(fam_model: FamModel, ids: torch.Tensor, weights: torch.Tensor,
                  state: StreamState) -> tuple[torch.Tensor, torch.Tensor]:
    """For each weighted token in order: whether it is the argmax, and its log-probability."""
    hits, logprobs = [], []
    for _, scored in weighted_predictions(fam_model, ids, weights, state):
        if scored is not None:
            logits, targets, _ = scored
            hits.append(logits.argmax(-1) == targets)
            logprobs.append(-F.cross_entropy(logits.float(), targets, reduction="none"))
    return torch.cat(hits), torch.cat(logprobs)


# -- checkpoints ---------------------------------------------------------------------------------
def trainable_state(peft_model, prompt: torch.Tensor | None) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    state = {f"lora.{k}": v.detach().cpu().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    if prompt is not None:
        state["fam_prompt"] = prompt.detach().cpu().clone()
    return state


def save_checkpoint(directory: Path, peft_model, prompt, optimizer, step: int, rng: random.Random,
                    state_passing: StatePassing, history: list) -> None:
    """Everything needed to continue exactly: weights, optimizer, step, data/RNG states, RSP state."""
    from safetensors.torch import save_file

    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(peft_model, prompt), str(tmp / "trainable.safetensors"))
    torch.save({
        "optimizer": optimizer.state_dict(),
        "step": step,
        "python_rng": rng.getstate(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "rsp_saved": None if state_passing.saved is None else [t.cpu() for t in state_passing.saved],
        "history": history,
    }, tmp / "state.pt")
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)  # a checkpoint is either complete or absent


def load_checkpoint(directory: Path, peft_model, prompt, optimizer, rng: random.Random,
                    state_passing: StatePassing, device) -> tuple[int, list]:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not (directory / "state.pt").is_file():
        raise ConfigError(f"{directory} holds no complete checkpoint to resume from")
    tensors = load_file(str(directory / "trainable.safetensors"))
    lora = {k[len("lora."):]: v for k, v in tensors.items() if k.startswith("lora.")}
    set_peft_model_state_dict(peft_model, lora)
    if prompt is not None:
        with torch.no_grad():
            prompt.copy_(tensors["fam_prompt"].to(prompt.device))
    saved = torch.load(directory / "state.pt", map_location="cpu", weights_only=True)  # no pickled code runs
    optimizer.load_state_dict(saved["optimizer"])
    rng.setstate(saved["python_rng"])
    torch.set_rng_state(saved["torch_rng"])
    if saved.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    if saved["rsp_saved"] is not None:
        state_passing.saved = tuple(t.to(device) for t in saved["rsp_saved"])
    return saved["step"], saved["history"]


# -- the run -------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, config: TrainConfig, loaded=None, accelerator=None, data=None):
        """``loaded``: a LoadedModel (default: load ``config.model``); ``data``: anything with
        ``draw(rng) -> Example`` (default: the mixture of ``config.data``)."""
        config.validate()
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.out = Path(config.out)
        if accelerator is None:
            from accelerate import Accelerator

            # cpu=True also where no GPU exists: Accelerate then runs launched processes as MULTI_CPU (gloo)
            accelerator = Accelerator(cpu=config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()))
        self.accelerator = accelerator
        if loaded is None:
            from famviz.io.models import load_model

            # several processes: each on its own device (accelerate's cuda:LOCAL_RANK), whatever --device says
            device = str(accelerator.device) if config.device == "auto" or accelerator.num_processes > 1 else config.device
            loaded = load_model(config.model, device=device, dtype=config.dtype)
        self.loaded = loaded
        torch.manual_seed(config.seed)  # LoRA's random init: the same in every run and on every process
        self.peft_model = add_lora(loaded, config.lora_rank, config.lora_alpha)
        fam_config = config.fam_config()
        self.prompt = None
        if fam_config.active_fam_len:
            from famviz.core.fam_prompt import default_fam_prompt

            # float32 master weights, like the LoRA's (peft keeps those in float32): a bfloat16 step casts
            # them inside the graph, so updates smaller than bfloat16's resolution are not lost.
            self.prompt = torch.nn.Parameter(default_fam_prompt(loaded, config.fam_len).float().to(loaded.device))
        self.fam_model = TrainingFamModel(loaded, fam_config, fam_prompt=self.prompt)
        self.fam_model.checkpoint_layers = config.checkpoint_layers
        self.fam_model.fused_projections = True
        self.theta = rope_theta(loaded.config)
        lora_params = [p for p in self.peft_model.parameters() if p.requires_grad]
        groups = [{"params": lora_params, "lr": config.lr, "weight_decay": config.weight_decay}]
        if self.prompt is not None:
            groups.append({"params": [self.prompt], "lr": config.prompt_lr or config.lr, "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.99))
        self.base_lrs = [g["lr"] for g in groups]
        self.rng = random.Random(config.seed)  # the same on every process: each takes its slice of a global batch
        self.state_passing = StatePassing(config.rsp_prob if config.rsp and self.prompt is not None else 0.0)
        self.step = 0
        self.history: list[dict] = []
        self.text = None  # the copy examples' text: the machine's, or --corpus (training split only)
        if data is None and "copy" in parse_mixture(config.data):
            documents = None
            if config.corpus:
                from famviz.io.corpus import Corpus

                documents = Corpus(config.corpus)
            self.text = TextCorpus(loaded.tokenizer, documents=documents)
            self.text.check_long_enough(parse_range(config.copy_text_tokens, "--copy-text-tokens")[1])
        self.data = data if data is not None else ExampleStream(
            loaded.tokenizer, parse_mixture(config.data), parse_range(config.passkey_tokens, "--passkey-tokens"),
            parse_range(config.copy_text_tokens, "--copy-text-tokens"), config.copy_len, config.copy_weight,
            config.text_weight, config.passkey_depth_zero, corpus=self.text, readout_weight=config.readout_weight,
            passkey_aligned=config.passkey_aligned, block_size=config.block_size)
        self.stages = config.curriculum_stages()
        self.stage = 0
        if config.init_from:
            self.init_from(config.init_from)
        pad = loaded.tokenizer.pad_token_id if loaded.tokenizer is not None else None
        self.pad_id = pad if pad is not None else (loaded.config.eos_token_id or 0)
        if isinstance(self.pad_id, list):
            self.pad_id = self.pad_id[0]

    @property
    def trainable_parameters(self) -> list[torch.Tensor]:
        params = [p for p in self.peft_model.parameters() if p.requires_grad]
        return params + ([self.prompt] if self.prompt is not None else [])

    def resume(self) -> None:
        self.step, self.history = load_checkpoint(self.out / CHECKPOINT_DIR, self.peft_model, self.prompt,
                                                  self.optimizer, self.rng, self.state_passing, self.loaded.device)
        self.stage = resumed_stage(self.history, self.stages)
        log.info("resumed from %s at step %d", self.out / CHECKPOINT_DIR, self.step)

    def init_from(self, directory: str) -> None:
        """Start from an adapter's LoRA weights and FAM prompt (exactly as stored; the optimizer starts fresh)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        from famviz.io.adapters import LORA_FILE, check_compatible, read_adapter

        adapter = read_adapter(directory)
        check_compatible(adapter, self.loaded, self.config.fam_config())
        lora_path = Path(directory) / LORA_FILE
        if not lora_path.is_file():
            raise ConfigError(f"--init-from {directory}: the adapter has no LoRA weights ({LORA_FILE})")
        rank = json.loads((Path(directory) / "adapter_config.json").read_text()).get("r")
        if rank != self.config.lora_rank:
            raise ConfigError(f"--init-from {directory}: its LoRA rank is {rank}, this run's is {self.config.lora_rank} "
                              f"(pass --lora-rank {rank})")
        result = set_peft_model_state_dict(self.peft_model, load_file(str(lora_path)))
        missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
        if missing:
            raise ConfigError(f"--init-from {directory}: {len(missing)} LoRA weights missing, e.g. {missing[0]}")
        if self.prompt is not None:
            if adapter.fam_prompt is None:
                raise ConfigError(f"--init-from {directory}: the adapter has no FAM prompt")
            with torch.no_grad():
                self.prompt.copy_(adapter.fam_prompt.to(self.prompt.device, self.prompt.dtype))
        log.info("initialised from the adapter in %s", directory)

    @property
    def curriculum_blocks(self) -> int | None:
        """The current curriculum stage: the longest PassKey prompt in blocks (None without a curriculum)."""
        return self.stages[self.stage] if self.stages else None

    def apply_curriculum(self) -> None:
        """PassKey prompts of 1 … n blocks (uniform in tokens, so uniform in block count) at stage n."""
        if self.stages and hasattr(self.data, "passkey_tokens"):
            low = parse_range(self.config.passkey_tokens, "--passkey-tokens")[0]
            high = self.curriculum_blocks * self.config.block_size
            self.data.passkey_tokens = (min(low, high), high)

    def _readout_split(self, drawn: list[Example]) -> int:
        """Where this step's probes cross into a new block: after the question and the answer's first
        0…k-2 tokens (as round prompt lengths minus 0-6 tokens put them in the evaluation), for the batch's
        shortest answer k. Drawn from the global batch, so every process consumes the generator alike."""
        probes = [e.readout for e in drawn if e.readout is not None]
        asked = min(next(i for i, w in enumerate(p.weights) if w > 0) for p in probes)
        shortest = min(len(p.ids) for p in probes) - asked
        if self.rng.random() >= self.config.readout_split or shortest < 2:
            return 0
        return asked + self.rng.randint(0, shortest - 2)

    def train_step(self) -> dict:
        """One optimiser step on one batch; returns its log record."""
        config = self.config
        self.apply_curriculum()
        # Every process draws the whole global batch from the same generator and keeps its own slice, so
        # N processes with batch b train on exactly the examples of one process with batch N·b.
        world, rank, batch = self.accelerator.num_processes, self.accelerator.process_index, config.batch_size
        drawn = [self.data.draw(self.rng) for _ in range(batch * world)]
        examples = drawn[rank * batch : (rank + 1) * batch]
        # Padded to the global batch's longest sequence: FAM rows read a block's pad tokens too, so a slice
        # padded less would pass on (RSP) a different FAM than the same row in one process's batch.
        ids, weights, readout = collate(examples, self.pad_id, self.loaded.device, max(len(e.ids) for e in drawn))
        offsets = draw_position_offsets(self.rng, len(drawn), self.theta) if config.rpo else None
        self.fam_model.position_offsets = offsets[rank * batch : (rank + 1) * batch] if offsets is not None else None
        passed = self.state_passing.choose(self.rng) if self.prompt is not None else None
        lr_scale = min(1.0, (self.step + 1) / max(1, config.warmup_steps))
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * lr_scale
        self.peft_model.train()
        state = initial_training_state(self.fam_model, len(examples), self.prompt, passed)
        # Probes at a random place in their block: read only right after the FAM, they teach a reading that
        # fails for the real question, which sits at the end of its block (measured: probe loss 0.003 vs
        # main answer 1.3 per token on the same prompt).
        # Drawn from the global batch's probes, so that every process consumes the generator alike.
        probes = [len(e.readout.ids) for e in drawn if e.readout is not None]
        offset = self.rng.randint(0, max(0, config.block_size - max(probes))) if probes else 0
        split = self._readout_split(drawn) if probes and config.readout_split > 0 else 0
        parts: dict = {}
        loss, final, count = sequence_loss(self.fam_model, ids, weights, state, readout=readout, readout_offset=offset,
                                           parts=parts, readout_split=split)
        self.optimizer.zero_grad(set_to_none=True)
        params = self.trainable_parameters
        if world > 1:
            # The loss is Σ w·nll over the global batch ÷ its weighted count: scaled so that the mean of the
            # processes' gradients is that (each process alone knows only its own count).
            total = float(self.accelerator.reduce(torch.tensor([float(count)], device=loss.device), reduction="sum"))
            local = loss * count
            (local * (world / max(total, 1.0))).backward()
            loss = self.accelerator.reduce(local.detach().reshape(1), reduction="sum")[0] / max(total, 1.0)
            parts = global_parts(self.accelerator, parts)
            for p in params:  # layers are called directly, so average gradients by hand
                # A parameter without a gradient (the prompt, on a step that starts from a passed FAM) has none
                # on every process: that choice comes from the shared generator. It stays None, as in one
                # process, so the optimiser leaves it alone (a zero gradient would still move it by momentum).
                if p.grad is not None:
                    p.grad = self.accelerator.reduce(p.grad, reduction="mean")
        else:
            loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
        self.optimizer.step()
        self.fam_model.position_offsets = None
        if self.prompt is not None:
            fam = final.fam
            if world > 1:  # the global batch's element 0 is process 0's: every process passes on the same FAM
                from accelerate.utils import broadcast

                fam = tuple(broadcast(f[:1].detach().contiguous(), from_process=0) for f in fam)
            self.state_passing.remember(fam)
        self.step += 1
        return {"step": self.step, "loss": loss.item(), "loss_main": parts["main"], "loss_readout": parts["readout"],
                "lengths": [len(e.ids) for e in drawn],
                "kind": "+".join(e.kind for e in examples),
                "tokens": int(ids.numel()) * world, "loss_tokens": count, "grad_norm": grad_norm,
                "rsp": passed is not None, "lr": self.optimizer.param_groups[0]["lr"]}

    def agreed(self, decision: bool) -> bool:
        """The main process's decision, on every process: processes deciding alone (a clock that started a
        few seconds apart, an accuracy that differs in the last bit) would leave their collectives unmatched."""
        if self.accelerator.num_processes == 1:
            return decision
        from accelerate.utils import broadcast

        flag = torch.tensor([1.0 if decision else 0.0], device=self.accelerator.device)
        return bool(broadcast(flag, from_process=0).item())

    def evaluate(self) -> dict:
        """Held-out PassKey (teacher-forced) at --eval-tokens, or at the curriculum stage's length, which
        advances to the next stage when the accuracy reaches the threshold."""
        config = self.config
        self.peft_model.eval()
        length = self.curriculum_blocks * config.block_size if self.stages else config.eval_tokens
        result = passkey_teacher_forced(self.fam_model, self.loaded.tokenizer, self.prompt, length,
                                        config.eval_trials, seed=1_000_000)
        record = {"step": self.step, "eval": result}
        if self.stages:
            record["curriculum_blocks"] = self.curriculum_blocks
            record["advanced"] = self.agreed(result["accuracy"] >= config.curriculum_threshold
                                             and self.stage + 1 < len(self.stages))
            if record["advanced"]:
                self.stage += 1
                log.info("curriculum: %.0f%% at %d blocks, now PassKey prompts of up to %d blocks",
                         100 * result["accuracy"], record["curriculum_blocks"], self.curriculum_blocks)
        self.peft_model.train()
        return record

    def run(self, resume: bool = False, progress: bool = True) -> Path:
        config, acc = self.config, self.accelerator
        main = acc.is_main_process
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / TRAIN_CONFIG).write_text(json.dumps(asdict(config), indent=2))
        if resume:
            self.resume()
            if main:  # steps run after the last checkpoint were lost with the interruption: drop their records
                (self.out / LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in self.history
                                                         if "stage" not in r))  # stages are in the card
        self.history.append({"stage": "start", "from_step": self.step, "command": config.stage_command or config.command})
        started = time.time()
        wall_before = sum(r.get("seconds", 0.0) for r in self.history if "loss" in r)
        bar = None
        if progress and main:
            from tqdm.auto import tqdm

            bar = tqdm(total=config.steps, initial=self.step, desc=f"train {config.mode}", unit="step",
                       mininterval=1.0 if sys.stderr.isatty() else 30.0, file=sys.stderr)
        log_file = (self.out / LOG_FILE).open("a") if main else None
        smoothed = None
        stopped_early = False
        try:
            while self.step < config.steps:
                t0 = time.time()
                record = self.train_step()
                record["seconds"] = time.time() - t0
                record["tokens_per_s"] = record["tokens"] / max(record["seconds"], 1e-9)  # the global batch's tokens
                self.history.append(record)
                smoothed = record["loss"] if smoothed is None else 0.95 * smoothed + 0.05 * record["loss"]
                if main:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{smoothed:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                    if not sys.stderr.isatty() and self.step % 10 == 0:
                        log.info("step %d loss %.4f (smoothed %.4f) %.0f tok/s", self.step, record["loss"], smoothed,
                                 record["tokens_per_s"])
                if config.eval_every and self.step % config.eval_every == 0:
                    # on every process: the curriculum it may advance decides every process's data
                    evaluation = self.evaluate()
                    self.history.append(evaluation)
                if config.eval_every and self.step % config.eval_every == 0 and main:
                    log_file.write(json.dumps(evaluation) + "\n")
                    log_file.flush()
                    log.info("step %d held-out PassKey (%d tokens, teacher-forced): %.0f%%, key log-prob %.2f",
                             self.step, evaluation["eval"]["length"], 100 * evaluation["eval"]["accuracy"],
                             evaluation["eval"]["key_logprob"])
                if self.step % config.checkpoint_every == 0 and main:
                    save_checkpoint(self.out / CHECKPOINT_DIR, self.peft_model, self.prompt, self.optimizer,
                                    self.step, self.rng, self.state_passing, self.history)
                if self.agreed(config.max_minutes is not None and time.time() - started > 60 * config.max_minutes):
                    log.info("stopping after %.1f minutes (--max-minutes) at step %d", config.max_minutes, self.step)
                    stopped_early = True
                    break
        finally:
            if bar is not None:
                bar.close()
            if log_file is not None:
                log_file.close()
        if main:
            save_checkpoint(self.out / CHECKPOINT_DIR, self.peft_model, self.prompt, self.optimizer, self.step,
                            self.rng, self.state_passing, self.history)
            self.save_adapter(wall_seconds=wall_before + time.time() - started, stopped_early=stopped_early)
            write_loss_curve(self.history, self.out, self.config.mode)
        acc.wait_for_everyone()
        return self.out

    def save_adapter(self, wall_seconds: float, stopped_early: bool = False) -> None:
        from famviz.io.adapters import write_adapter, write_training_card
        from famviz.io.models import resolve_dtype

        lora_dtype = resolve_dtype(self.config.adapter_dtype) if self.config.adapter_dtype else None
        write_adapter(self.out, self.loaded, self.config.fam_config(), self.prompt, self.peft_model, lora_dtype)
        write_training_card(self.out, training_card(self, wall_seconds, stopped_early))


def stage_summaries(history: list[dict], first_command: str = "") -> list[dict]:
    """One record per invocation of a run (``stage`` markers in the history): its command, steps, tokens,
    wall time and the last held-out PassKey evaluation it made. Steps recorded before any marker (runs
    made before famviz kept them) form one first stage with ``first_command``."""
    stages: list[dict] = []

    def start(from_step: int, command: str) -> None:
        stages.append({"stage": len(stages) + 1, "command": command, "first_step": from_step + 1,
                       "last_step": from_step, "tokens": 0, "wall_seconds": 0.0, "held_out": None})

    for record in history:
        if "stage" in record:
            start(record["from_step"], record["command"])
            continue
        if not stages and ("loss" in record or "eval" in record):
            start(0, first_command or "(not recorded)")
        if "loss" in record:
            stage = stages[-1]
            stage["last_step"] = record["step"]
            stage["tokens"] += record["tokens"]
            stage["wall_seconds"] = round(stage["wall_seconds"] + record.get("seconds", 0.0), 1)
        elif "eval" in record:
            stages[-1]["held_out"] = dict(step=record["step"], **record["eval"],
                                          **({"curriculum_blocks": record["curriculum_blocks"]}
                                             if "curriculum_blocks" in record else {}))
    return stages


def previous_card(directory: Path) -> dict:
    from famviz.io.adapters import read_training_card

    try:
        return read_training_card(directory)
    except Exception:  # noqa: BLE001 - no card yet (a new run) or an unreadable one: nothing to carry over
        return {}


def initialised_from(directory: str | None) -> dict | None:
    """What a run started from with --init-from: the source adapter's own card in brief."""
    if not directory:
        return None
    card = previous_card(Path(directory))
    return {"directory": directory, "steps": card.get("steps"), "tokens_seen": card.get("tokens_seen"),
            "wall_seconds": card.get("wall_seconds"), "command": card.get("command"),
            "stages": card.get("stages") or None, "stage_evaluations": card.get("stage_evaluations") or None}


def text_sources(trainer: Trainer):
    """The card's record of the training text: the corpus (paths, counts, held-out split, unreadable
    documents skipped) or the machine's text files."""
    if trainer.text is None:
        return None
    described = trainer.text.documents.describe()
    if isinstance(described, dict):
        described = dict(described, unreadable_skipped=len(trainer.text.unreadable))
    return described


def training_card(trainer: Trainer, wall_seconds: float, stopped_early: bool) -> dict:
    config = trainer.config
    steps = [r for r in trainer.history if "loss" in r]
    evals = [r for r in trainer.history if "eval" in r]
    device = trainer.loaded.device
    if device.type == "cuda":
        hardware = f"{trainer.accelerator.num_processes} × {torch.cuda.get_device_name(device)}"
    else:
        hardware = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        if trainer.accelerator.num_processes > 1:
            hardware = f"{trainer.accelerator.num_processes} processes × {hardware}"
    tail = steps[-50:]
    note = None
    if device.type != "cuda":
        note = ("Reduced CPU recipe: trained on a CPU with far fewer steps and shorter sequences than the paper's "
                "GPU recipe (docs/algorithm.md §6); see the evaluation before relying on it.")
    return {
        "note": note,
        "command": config.command,
        "base_model": trainer.loaded.name,
        "mode": config.mode,
        "fam": config.fam_config().to_dict(),
        "steps": trainer.step,
        "stopped_early": stopped_early,
        "tokens_seen": sum(r["tokens"] for r in steps),
        "batch_size": config.batch_size,
        "optimizer": f"AdamW (betas 0.9/0.99), lr {config.lr}, prompt lr {config.prompt_lr or config.lr}, "
                     f"warm-up {config.warmup_steps} steps then constant, grad clip {config.grad_clip}",
        "lora": {"rank": config.lora_rank, "alpha": config.lora_alpha or 2 * config.lora_rank,
                 "targets": list(LORA_TARGETS)},
        "fam_prompt": "trained in full" if config.mode == "fam" else None,
        "data_mixture": {
            "weights": parse_mixture(config.data),
            "passkey_tokens": config.passkey_tokens,
            "passkey_depth_zero": config.passkey_depth_zero, "passkey_aligned": config.passkey_aligned,
            "copy_text_tokens": config.copy_text_tokens, "copy_len": config.copy_len,
            "copy_weight": config.copy_weight, "text_weight": config.text_weight,
            "readout_weight": config.readout_weight, "readout_split": config.readout_split,
            "curriculum_blocks": config.curriculum,
            "curriculum_threshold": config.curriculum_threshold if config.curriculum else None,
            "curriculum_reached_blocks": trainer.curriculum_blocks,
            "text_sources": text_sources(trainer),
        },
        "initialised_from": initialised_from(config.init_from),
        "stages": stage_summaries(trainer.history, config.command.split("  (resumed: ")[0]),
        "stage_evaluations": previous_card(trainer.out).get("stage_evaluations", []),
        "checkpoint_layers": config.checkpoint_layers,
        "rpo": config.rpo, "rsp": config.rsp, "rsp_prob": config.rsp_prob if config.rsp else None,
        "hardware": hardware, "dtype": config.dtype, "wall_seconds": round(wall_seconds, 1),
        "lora_storage_dtype": config.adapter_dtype or config.dtype,
        "final_loss_mean_last_50": sum(r["loss"] for r in tail) / max(len(tail), 1),
        "held_out_passkey_during_training": [dict(step=r["step"], **r["eval"]) for r in evals],
        "evaluation": {},
        "software": {"torch": torch.__version__, "python": platform.python_version()},
    }


def write_loss_curve(history: list[dict], out: Path, mode: str = "fam") -> Path | None:
    """``loss_curve.html`` (PNG too when kaleido can): the training loss per data kind (their scales differ:
    a PassKey answer against a whole text) with moving means, and the held-out PassKey key log-probability
    with the prompt length of each evaluation (curricula change it)."""
    steps = [r for r in history if "loss" in r]
    if not steps:
        return None
    import plotly.graph_objects as go
    from plotly.colors import DEFAULT_PLOTLY_COLORS
    from plotly.subplots import make_subplots

    window = 25
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.62, 0.38], vertical_spacing=0.08)
    for index, kind in enumerate(sorted({r["kind"] for r in steps})):
        rows = [r for r in steps if r["kind"] == kind]
        x, y = [r["step"] for r in rows], [r["loss"] for r in rows]
        smooth = [sum(y[max(0, i - window + 1) : i + 1]) / (i - max(0, i - window + 1) + 1) for i in range(len(y))]
        color = DEFAULT_PLOTLY_COLORS[index % len(DEFAULT_PLOTLY_COLORS)]
        figure.add_trace(go.Scatter(x=x, y=y, mode="markers", marker=dict(size=3, opacity=0.3, color=color),
                                    name=f"{kind}: per step", legendgroup=kind), row=1, col=1)
        figure.add_trace(go.Scatter(x=x, y=smooth, mode="lines", line=dict(color=color),
                                    name=f"{kind}: mean of last {window} steps", legendgroup=kind), row=1, col=1)
        probed = [r for r in rows if r.get("loss_readout") is not None]
        for field_name, label, dash in (("loss_main", "the question's answer", "dot"),
                                        ("loss_readout", "read-out probes", "dash")):
            if not probed:
                break
            ys = [r[field_name] for r in probed]
            means = [sum(ys[max(0, i - window + 1) : i + 1]) / (i - max(0, i - window + 1) + 1) for i in range(len(ys))]
            figure.add_trace(go.Scatter(x=[r["step"] for r in probed], y=means, mode="lines",
                                        line=dict(color=color, dash=dash), legendgroup=kind,
                                        name=f"{kind}: {label} (mean of last {window})"), row=1, col=1)
    evals = [r for r in history if "eval" in r]
    if evals:
        labels = [f"{r['eval']['length']} tokens, {r['eval']['accuracy']:.0%} of {r['eval']['trials']}" for r in evals]
        figure.add_trace(go.Scatter(x=[r["step"] for r in evals], y=[r["eval"]["key_logprob"] for r in evals],
                                    mode="lines+markers+text", text=[str(r["eval"]["length"]) for r in evals],
                                    textposition="top center", cliponaxis=False, line=dict(color="#444"),
                                    customdata=labels, name="key log-prob (label: tokens)",
                                    hovertemplate="step %{x}: %{y:.2f}<br>%{customdata}<extra></extra>"), row=2, col=1)
    figure.update_layout(title=f"{mode} fine-tuning", template="plotly_white", width=900, height=620)
    figure.update_xaxes(title_text="step", row=2, col=1)
    figure.update_yaxes(title_text="training loss (weighted)", row=1, col=1)
    figure.update_yaxes(title_text="held-out log p(key)<br>depth 0, teacher-forced", row=2, col=1)
    path = out / "loss_curve.html"
    figure.write_html(str(path), include_plotlyjs=True)
    try:
        figure.write_image(str(out / "loss_curve.png"))
    except Exception as exc:  # noqa: BLE001 - no Chromium: the HTML is the figure
        log.info("no PNG loss curve (%s); loss_curve.html has it", type(exc).__name__)
    return path


# -- command line ----------------------------------------------------------------------------------
def add_train_arguments(parser) -> None:
    """Options of ``python -m famviz train`` (defaults: TrainConfig; None = keep the resumed run's)."""
    d = TrainConfig(out="")
    parser.add_argument("--out", metavar="DIR", help="output directory: the adapter, checkpoints, logs")
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    parser.add_argument("--model", default=None, help="HF id or local path (default: the bundled SmolLM2-135M)")
    parser.add_argument("--mode", choices=("fam", "bswa"), default=None, help=f"default {d.mode}")
    for name, kind, help_text in (
        ("block_size", int, "tokens per block"), ("fam_len", int, "FAM slots per layer"),
        ("mem_blocks", int, "cached memory blocks"), ("steps", int, "optimiser steps in total"),
        ("lr", float, "LoRA learning rate"), ("prompt_lr", float, "FAM prompt learning rate (default: --lr)"),
        ("warmup_steps", int, "linear warm-up steps"), ("batch_size", int, "sequences per step (per process)"),
        ("lora_rank", int, "LoRA rank"), ("lora_alpha", float, "LoRA alpha (default 2×rank)"),
        ("data", str, "mixture, e.g. passkey:0.8,copy:0.2"),
        ("passkey_tokens", str, "PassKey prompt length range in tokens, e.g. 256-2048"),
        ("passkey_depth_zero", float, "share of PassKey prompts with the key at depth 0"),
        ("passkey_aligned", float, "share of PassKey prompts a whole number of blocks long (minus 0-6 tokens), "
                                   "so that the answer is read from the FAM alone"),
        ("copy_text_tokens", str, "text length range of copy examples"), ("copy_len", int, "tokens to repeat"),
        ("copy_weight", float, "loss weight of repeated tokens (paper: 0.1)"),
        ("text_weight", float, "loss weight of ordinary next-token prediction on the copy text"),
        ("readout_weight", float, "PassKey read-out probe after every block, weight of its answer (0 = off)"),
        ("readout_split", float, "share of steps whose probes end a block after the question, the answer read "
                                 "from the FAM alone as at round prompt lengths"),
        ("curriculum", str, "PassKey lengths in blocks, e.g. 2,4,8,16: the next when held-out accuracy reaches the threshold"),
        ("curriculum_threshold", float, "held-out accuracy that advances the curriculum"),
        ("init_from", str, "start from this adapter directory's LoRA and FAM prompt (fresh optimizer)"),
        ("rsp_prob", float, "Random State Passing probability (paper: 0.8)"),
        ("eval_every", int, "held-out PassKey evaluation every N steps (0 = never)"),
        ("eval_trials", int, "held-out PassKey prompts per evaluation"),
        ("eval_tokens", int, "length of held-out PassKey prompts"),
        ("checkpoint_every", int, "checkpoint every N steps"),
        ("max_minutes", float, "stop after this wall time (checkpoint and adapter are written)"),
        ("seed", int, "random seed"), ("dtype", str, "float32 or bfloat16"),
        ("adapter_dtype", str, "store the adapter's LoRA weights as float16/bfloat16 (half the file size)"),
    ):
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                            help=f"{help_text} (default {getattr(d, name)})")
    parser.add_argument("--corpus", action="append", default=None, metavar="PATH",
                        help="train on your own text (repeatable): a directory of documents (.txt .md .pdf .html), "
                             "a .jsonl file with a 'text' field, or a Hugging Face dataset (.parquet/.arrow files or a "
                             "save_to_disk directory); ~1%% of its documents are held out. Default: the machine's text")
    parser.add_argument("--no-rpo", dest="rpo", action="store_false", default=None, help="disable Random Position Offset")
    parser.add_argument("--no-rsp", dest="rsp", action="store_false", default=None, help="disable Random State Passing")
    parser.add_argument("--rsp", dest="rsp", action="store_true", default=None,
                        help="enable Random State Passing (the default; e.g. to turn it on when resuming a run)")
    parser.add_argument("--no-checkpoint-layers", dest="checkpoint_layers", action="store_false", default=None,
                        help="keep every layer's activations instead of recomputing them in backward (faster, more memory)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    parser.add_argument("--device", default=None, help="auto, cpu or cuda (default auto: Accelerate's device)")


def config_from_args(args) -> tuple[TrainConfig, bool]:
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
                 if f.name not in ("out", "command") and getattr(args, f.name, None) is not None}
    argv = sys.argv[1:] if "train" in sys.argv[1:2] else []
    command = "python -m famviz " + " ".join(shlex.quote(a) for a in argv) if argv else "python -m famviz train (from Python)"
    if args.resume:
        saved = Path(args.resume) / TRAIN_CONFIG
        if not saved.is_file():
            raise ConfigError(f"{args.resume} is not a training run to resume (no {TRAIN_CONFIG})")
        config = TrainConfig.from_dict(json.loads(saved.read_text()))
        config = replace(config, out=str(args.resume), stage_command=command, **overrides)
        config.command = f"{config.command}  (resumed: {command})"
        return config, True
    if not args.out:
        raise ConfigError("train needs --out DIR (or --resume DIR)")
    if (Path(args.out) / CHECKPOINT_DIR).exists():
        raise ConfigError(f"{args.out} already holds a training run; use --resume {args.out} or another --out")
    return replace(TrainConfig(out=args.out, command=command, stage_command=command), **overrides), False


def run_train(args) -> int:
    config, resume = config_from_args(args)
    config.validate()  # before anything is written or logged
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    # train.log is the main process's (RANK is set by accelerate launch / torchrun for every process)
    handler = logging.FileHandler(out / "train.log") if os.environ.get("RANK", "0") == "0" else logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("famviz").addHandler(handler)
    logging.getLogger("famviz").setLevel(logging.INFO)
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in logging.getLogger().handlers + logging.getLogger("famviz").handlers):
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter("%(message)s"))
        logging.getLogger("famviz").addHandler(stream)
    log.info("training %s: %s", config.mode, json.dumps(asdict(config)))
    try:
        trainer = Trainer(config)
        trainer.run(resume=resume)
    finally:
        logging.getLogger("famviz").removeHandler(handler)
        handler.close()
    print(str(out))
    return 0
