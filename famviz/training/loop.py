"""The training loop: LoRA + a learned initial FAM prompt (docs/algorithm.md §3, §5, §6).

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
import random
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from famviz.errors import ConfigError
from famviz.training.card import best_evaluation, recent_loss, training_card
from famviz.training.checkpoints import load_checkpoint, save_checkpoint
from famviz.training.config import (
    BEST_DIR,
    CHECKPOINT_DIR,
    LOG_FILE,
    LORA_TARGETS,
    TRAIN_CONFIG,
    TrainConfig,
)
from famviz.training.data import Example, ExampleStream, TextCorpus, parse_mixture, parse_range
from famviz.training.loss import (
    LossParts,
    SequenceLoss,
    collate,
    global_parts,
    passkey_teacher_forced,
    sequence_loss,
)
from famviz.training.recipe import RECIPE_FILE, recipe_text
from famviz.training.rpo_rsp import (
    StatePassing,
    TrainingFamModel,
    draw_position_offsets,
    initial_training_state,
    rope_theta,
)
from famviz.training.used_state import PasskeyFiller, UsedStates
from famviz.viz.training_figures import write_loss_curve

if TYPE_CHECKING:
    from logging.handlers import MemoryHandler
    from typing import Protocol, TextIO

    from accelerate import Accelerator
    from peft import PeftModel
    from tqdm import tqdm

    from famviz.core.fam_model import StreamState
    from famviz.core.model import LoadedModel
    from famviz.io.corpus import Corpus

    class ExampleSource(Protocol):
        """Anything that draws training examples (``ExampleStream`` by default)."""

        def draw(self, rng: random.Random) -> Example: ...


log = logging.getLogger("famviz.training")


def loss_postfix(history: list[dict]) -> dict[str, str]:
    """The progress bar's losses: the last step's, and the mean over the last steps labelled with how many
    it averages (``loss(avg3)`` after three steps), so that neither is mistaken for the other."""
    last = next((r["loss"] for r in reversed(history) if "loss" in r), None)
    mean, count = recent_loss(history)
    if last is None:
        return {}
    return {"loss": f"{last:.3f}", f"loss(avg{count})": f"{mean:.3f}"}


def beats(evaluation: dict, best: dict | None) -> bool:
    """Whether a held-out evaluation is better than the best so far: higher accuracy, then higher key log-prob
    (the tie-break that 8-16 trials need)."""
    result = evaluation["eval"]
    # Scores of other prompts are not comparable: a curriculum's next length (or other --eval-trials) starts afresh.
    if best is None or (best["length"], best["trials"]) != (result["length"], result["trials"]):
        return True
    return (result["accuracy"], result["key_logprob"]) > (best["accuracy"], best["key_logprob"])


def resumed_stage(history: list[dict], stages: list[int]) -> int:
    """The curriculum stage a resumed run continues at: after the last evaluation's stage (and its advance)."""
    records = [r for r in history if "curriculum_blocks" in r]
    if not stages or not records:
        return 0
    last = records[-1]
    reached = last["curriculum_blocks"] if not last.get("advanced") else last["curriculum_blocks"] + 1
    return next((i for i, n in enumerate(stages) if n >= reached), len(stages) - 1)


def add_lora(loaded: LoadedModel, rank: int, alpha: float | None) -> PeftModel:
    """Wrap ``loaded.model`` with peft LoRA on the attention and MLP projections (modules patched in place)."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in loaded.model.named_modules()}
    targets = [t for t in LORA_TARGETS if t in present]
    lora = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        lora_dropout=0.0,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    from famviz.io.adapters import peft_quiet

    with peft_quiet():
        return get_peft_model(loaded.model, lora)


# -- the run -------------------------------------------------------------------------------------
def _default_accelerator(device: str) -> Accelerator:
    from accelerate import Accelerator

    # cpu=True also where no GPU exists: Accelerate then runs launched processes as MULTI_CPU (gloo)
    return Accelerator(cpu=device == "cpu" or (device == "auto" and not torch.cuda.is_available()))


def _pad_id(loaded: LoadedModel) -> int:
    """The token that pads a batch's shorter rows: the tokenizer's pad token, else end of text, else 0."""
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer is not None else None
    pad = pad if pad is not None else (loaded.config.eos_token_id or 0)
    return pad[0] if isinstance(pad, list) else pad


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        loaded: LoadedModel | None = None,
        accelerator: Accelerator | None = None,
        data: ExampleSource | None = None,
    ):
        """``loaded``: a LoadedModel (default: load ``config.model``); ``data``: anything with
        ``draw(rng) -> Example`` (default: the mixture of ``config.data``)."""
        config.validate()
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.out = Path(config.out)
        self.accelerator = accelerator if accelerator is not None else _default_accelerator(config.device)
        # The corpus first: a missing or unusable one fails in a moment, not after the model has loaded.
        documents = self._corpus_documents() if data is None else None
        self.loaded = loaded if loaded is not None else self._load_model()
        torch.manual_seed(config.seed)  # LoRA's random init: the same in every run and on every process
        self.peft_model = add_lora(self.loaded, config.lora_rank, config.lora_alpha)
        self.prompt = self._learned_prompt()
        self.fam_model = TrainingFamModel(self.loaded, config.fam_config(), fam_prompt=self.prompt)
        self.fam_model.checkpoint_layers = config.checkpoint_layers
        self.fam_model.fused_projections = True
        self.theta = rope_theta(self.loaded.config)
        self.optimizer, self.base_lrs = self._optimizer()
        self.rng = random.Random(config.seed)  # the same on every process: each takes its slice of a global batch
        self.state_passing = StatePassing(config.rsp_prob if config.rsp and self.prompt is not None else 0.0)
        self.step = 0
        self.history: list[dict] = []
        self._make_data(data, documents)
        self.stages = config.curriculum_stages()
        self.stage = 0
        if config.init_from:
            self.init_from(config.init_from)
        self.pad_id = _pad_id(self.loaded)

    def _load_model(self) -> LoadedModel:
        from famviz.io.models import load_model

        config = self.config
        # several processes: each on its own device (accelerate's cuda:LOCAL_RANK), whatever --device says
        several = self.accelerator.num_processes > 1
        device = str(self.accelerator.device) if config.device == "auto" or several else config.device
        return load_model(config.model, device=device, dtype=config.dtype)

    def _learned_prompt(self) -> torch.nn.Parameter | None:
        """The initial FAM to learn (None in a mode without FAM slots)."""
        if not self.config.fam_config().active_fam_len:
            return None
        from famviz.core.fam_prompt import default_fam_prompt

        # float32 master weights, like the LoRA's (peft keeps those in float32): a bfloat16 step casts
        # them inside the graph, so updates smaller than bfloat16's resolution are not lost.
        prompt = default_fam_prompt(self.loaded, self.config.fam_len).float().to(self.loaded.device)
        return torch.nn.Parameter(prompt)

    def _optimizer(self) -> tuple[torch.optim.Optimizer, list[float]]:
        """AdamW over the LoRA weights and the prompt (its own rate, no decay), and each group's base rate."""
        config = self.config
        lora_params = [p for p in self.peft_model.parameters() if p.requires_grad]
        groups = [{"params": lora_params, "lr": config.lr, "weight_decay": config.weight_decay}]
        if self.prompt is not None:
            groups.append({"params": [self.prompt], "lr": config.prompt_lr or config.lr, "weight_decay": 0.0})
        return torch.optim.AdamW(groups, betas=(0.9, 0.99)), [g["lr"] for g in groups]

    def _make_data(self, data: ExampleSource | None, documents: Corpus | None) -> None:
        """The examples (``data``, or the mixture of ``config.data``), the text they and the used states read,
        and the used states."""
        config, loaded = self.config, self.loaded
        self.text = None  # the copy examples' and used states' text: the machine's, or --corpus (training split)
        used_blocks = parse_range(config.used_state_blocks, "--used-state-blocks")
        used_reads = config.used_state_sources if self.prompt is not None else frozenset()  # a FAM to use
        copies = data is None and "copy" in parse_mixture(config.data)
        if copies or "text" in used_reads:
            self.text = TextCorpus(loaded.tokenizer, documents=documents)
            longest_copy = parse_range(config.copy_text_tokens, "--copy-text-tokens")[1] if copies else 0
            longest_used = used_blocks[1] * config.block_size if "text" in used_reads else 0
            self.text.check_long_enough(max(longest_copy, longest_used))
        self.used_states = UsedStates(
            config.used_state_prob if used_reads else 0.0,
            used_blocks,
            self.text,
            config.block_size,
            reads=config.used_state_reads,
            filler=PasskeyFiller(loaded.tokenizer) if "filler" in used_reads else None,
        )
        self.data = (
            data
            if data is not None
            else ExampleStream(
                loaded.tokenizer,
                parse_mixture(config.data),
                parse_range(config.passkey_tokens, "--passkey-tokens"),
                parse_range(config.copy_text_tokens, "--copy-text-tokens"),
                config.copy_len,
                config.copy_weight,
                config.text_weight,
                config.passkey_depth_zero,
                corpus=self.text,
                readout_weight=config.readout_weight,
                passkey_aligned=config.passkey_aligned,
                block_size=config.block_size,
            )
        )

    def _corpus_documents(self):
        """The --corpus documents of the copy examples and used states (None: the machine's text, or neither)."""
        uses_text = "copy" in parse_mixture(self.config.data) or "text" in self.config.used_state_sources
        if not self.config.corpus or not uses_text:
            return None
        from famviz.io.corpus import Corpus

        return Corpus(self.config.corpus)

    @property
    def trainable_parameters(self) -> list[torch.Tensor]:
        params = [p for p in self.peft_model.parameters() if p.requires_grad]
        return params + ([self.prompt] if self.prompt is not None else [])

    def resume(self) -> None:
        self.step, self.history = load_checkpoint(
            self.out / CHECKPOINT_DIR,
            self.peft_model,
            self.prompt,
            self.optimizer,
            self.rng,
            self.state_passing,
            self.loaded.device,
        )
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
            raise ConfigError(
                f"--init-from {directory}: its LoRA rank is {rank}, this run's is {self.config.lora_rank} "
                f"(pass --lora-rank {rank})"
            )
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
        world = self.accelerator.num_processes
        drawn, examples = self._draw_batch()
        # Padded to the global batch's longest sequence: every process runs the same blocks as one process
        # with the whole batch would (pad tokens carry no loss and come after everything that does).
        ids, weights, readout = collate(examples, self.pad_id, self.loaded.device, max(len(e.ids) for e in drawn))
        state, rsp, used_blocks, used_reads = self._starting_state(drawn, examples)
        lr_scale = config.lr_scale(self.step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * lr_scale
        self.peft_model.train()
        offset, split, fill = self._probe_placement(drawn)
        result = sequence_loss(
            self.fam_model,
            ids,
            weights,
            state,
            readout=readout,
            readout_offset=offset,
            readout_split=split,
            readout_fill=fill,
            fam_growth_weight=config.fam_growth_weight,
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss, parts = self._backward(result)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable_parameters, config.grad_clip))
        self.optimizer.step()
        self.fam_model.position_offsets = None
        if self.prompt is not None:
            fam = result.state.fam
            if world > 1:  # the global batch's element 0 is process 0's: every process passes on the same FAM
                from accelerate.utils import broadcast

                fam = tuple(broadcast(f[:1].detach().contiguous(), from_process=0) for f in fam)
            self.state_passing.remember(fam)
        self.step += 1
        return {
            "step": self.step,
            "loss": loss,
            "loss_main": parts.main,
            "loss_readout": parts.readout,
            "readout_split": split,  # 0: probes asked inside their block; else the question's length in tokens
            "readout_fill": fill,  # stream tokens before the question in its block (0: the question alone)
            "fam_growth": parts.fam_growth,  # mean log-norm growth of the FAM per update (FamGrowth)
            "lengths": [len(e.ids) for e in drawn],
            "kind": "+".join(e.kind for e in examples),
            "tokens": int(ids.numel()) * world,
            "loss_tokens": result.count,
            "grad_norm": grad_norm,
            "rsp": rsp,
            "used_blocks": 0 if rsp else used_blocks,  # blocks of text the FAM read first (0: none)
            "used_reads": None if rsp else used_reads,  # ... "text" or "filler"
            "lr": self.optimizer.param_groups[0]["lr"],
        }

    def _draw_batch(self) -> tuple[list[Example], list[Example]]:
        """The global batch, longest first, and this process's slice of it."""
        # Every process draws the whole global batch from the same generator and keeps its own slice, so
        # N processes with batch b train on exactly the examples of one process with batch N·b.
        world, rank, batch = self.accelerator.num_processes, self.accelerator.process_index, self.config.batch_size
        drawn = [self.data.draw(self.rng) for _ in range(batch * world)]
        # Longest first: RSP passes on element 0's final FAM, and only the longest row's FAM never reads the
        # pad tokens that fill shorter rows' last blocks (a stable sort: equal lengths keep their order).
        drawn.sort(key=lambda example: -len(example.ids))
        return drawn, drawn[rank * batch : (rank + 1) * batch]

    def _starting_state(self, drawn: list[Example], examples: list[Example]) -> tuple[StreamState, bool, int, str]:
        """The step's starting state (the initial FAM, a passed one under RSP, or a used one) and RPO's
        position offsets (set on the model); also whether RSP passed it, the used blocks and what they read."""
        rank, batch = self.accelerator.process_index, self.config.batch_size
        # Drawn and read before this step's RPO offsets are set: the used state is what inference would hand on.
        used_blocks = self.used_states.choose(self.rng, any(e.kind == "passkey" for e in examples))
        used, used_reads = (
            self.used_states.make(self.fam_model, self.prompt, used_blocks, self.rng) if used_blocks else (None, None)
        )
        offsets = draw_position_offsets(self.rng, len(drawn), self.theta) if self.config.rpo else None
        self.fam_model.position_offsets = offsets[rank * batch : (rank + 1) * batch] if offsets is not None else None
        passed = self.state_passing.choose(self.rng) if self.prompt is not None else None
        rsp = passed is not None  # a passed FAM wins over a used one
        state = initial_training_state(self.fam_model, len(examples), self.prompt, passed if rsp else used)
        return state, rsp, used_blocks, used_reads

    def _probe_placement(self, drawn: list[Example]) -> tuple[int, int, int]:
        """Where this step asks its read-out probes: (offset in the block, split, fill; see ``sequence_loss``)."""
        config = self.config
        # Probes at a random place in their block: read only right after the FAM, they teach a reading that
        # fails for the real question, which sits at the end of its block (measured: probe loss 0.003 vs
        # main answer 1.3 per token on the same prompt).
        # Drawn from the global batch's probes, so that every process consumes the generator alike.
        probes = [len(e.readout.ids) for e in drawn if e.readout is not None]
        offset = self.rng.randint(0, max(0, config.block_size - max(probes))) if probes else 0
        split = self._readout_split(drawn) if probes and config.readout_split > 0 else 0
        # Drawn only when asked for, so runs without fill keep their random sequence.
        use_fill = split > 0 and config.readout_fill > 0 and self.rng.random() < config.readout_fill
        fill = max(0, config.block_size - split) if use_fill else 0
        return offset, split, fill

    def _backward(self, result: SequenceLoss) -> tuple[float, LossParts]:
        """Backpropagate the step's loss (averaged over processes by hand where there are several); the
        loss over the global batch and its parts."""
        world = self.accelerator.num_processes
        if world == 1:
            result.loss.backward()
            return result.loss.item(), result.parts
        # The loss is Σ w·nll over the global batch ÷ its weighted count: scaled so that the mean of the
        # processes' gradients is that (each process alone knows only its own count).
        # The FAM-growth penalty likewise: λ Σ growth ÷ the global batch's count of counted updates.
        loss, count = result.loss, result.count
        counts = torch.tensor([float(count), float(result.parts.growth_count)], device=loss.device)
        total, growth_total = (max(c, 1.0) for c in self.accelerator.reduce(counts, reduction="sum").tolist())
        local = (loss - result.penalty) * count
        penalty_sum = result.penalty_sum.to(loss.device)
        (local * (world / total) + penalty_sum * (world / growth_total)).backward()
        both = torch.stack([local.detach(), penalty_sum.detach()])
        local_sum, penalty_total = self.accelerator.reduce(both, reduction="sum").tolist()
        for p in self.trainable_parameters:  # layers are called directly, so average gradients by hand
            # A parameter without a gradient (the prompt, on a step that starts from a passed FAM) has none
            # on every process: that choice comes from the shared generator. It stays None, as in one
            # process, so the optimiser leaves it alone (a zero gradient would still move it by momentum).
            if p.grad is not None:
                p.grad = self.accelerator.reduce(p.grad, reduction="mean")
        return local_sum / total + penalty_total / growth_total, global_parts(self.accelerator, result.parts)

    def agreed(self, decision: bool) -> bool:
        """The main process's decision, on every process: processes deciding alone (a clock that started a
        few seconds apart, an accuracy that differs in the last bit) would leave their collectives unmatched."""
        if self.accelerator.num_processes == 1:
            return decision
        from accelerate.utils import broadcast

        flag = torch.tensor([1.0 if decision else 0.0], device=self.accelerator.device)
        return bool(broadcast(flag, from_process=0).item())

    def evaluate(self) -> dict:
        """Held-out PassKey (teacher-forced) at --eval-tokens and --eval-depth, or at the curriculum stage's
        length, which advances to the next stage when the accuracy reaches the threshold."""
        config = self.config
        self.peft_model.eval()
        length = self.curriculum_blocks * config.block_size if self.stages else config.eval_tokens
        result = passkey_teacher_forced(
            self.fam_model,
            self.loaded.tokenizer,
            self.prompt,
            length,
            config.eval_trials,
            seed=1_000_000,
            depth=config.eval_depth,
        )
        record = {"step": self.step, "eval": result}
        if self.stages:
            record["curriculum_blocks"] = self.curriculum_blocks
            record["advanced"] = self.agreed(
                result["accuracy"] >= config.curriculum_threshold and self.stage + 1 < len(self.stages)
            )
            if record["advanced"]:
                self.stage += 1
                log.info(
                    "curriculum: %.0f%% at %d blocks, now PassKey prompts of up to %d blocks",
                    100 * result["accuracy"],
                    record["curriculum_blocks"],
                    self.curriculum_blocks,
                )
        self.peft_model.train()
        return record

    def run(self, resume: bool = False, progress: bool = True) -> Path:
        config, acc = self.config, self.accelerator
        main = acc.is_main_process
        self._open_run(resume)
        self.history.append(
            {"stage": "start", "from_step": self.step, "command": config.stage_command or config.command}
        )
        started = time.time()
        wall_before = sum(r.get("seconds", 0.0) for r in self.history if "loss" in r)
        bar = self._progress_bar() if progress and main else None
        log_file = (self.out / LOG_FILE).open("a") if main else None
        stopped_early = False
        try:
            while self.step < config.steps:
                t0 = time.time()
                record = self.train_step()
                record["seconds"] = time.time() - t0
                record["tokens_per_s"] = record["tokens"] / max(record["seconds"], 1e-9)  # the global batch's tokens
                self.history.append(record)
                if main:
                    self._log_step(record, log_file, bar)
                kept = False
                if config.eval_every and self.step % config.eval_every == 0:
                    # on every process: the curriculum it may advance decides every process's data
                    evaluation = self.evaluate()
                    self.history.append(evaluation)
                    if main:
                        kept = self._record_evaluation(evaluation, log_file, wall_before + time.time() - started)
                # After a kept best at once: a resume must not redo this step without the flag that names best/.
                if (self.step % config.checkpoint_every == 0 or kept) and main:
                    self.save_checkpoint()
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
            self.save_checkpoint()
            self.save_adapter(wall_before + time.time() - started, stopped_early=stopped_early)
            write_loss_curve(self.history, self.out, self.config.mode)
        acc.wait_for_everyone()
        return self.out

    def _open_run(self, resume: bool) -> None:
        """Write the run's settings and recipe; on a resume, load the checkpoint and drop the log's records of
        steps run after it (they were lost with the interruption)."""
        config, main = self.config, self.accelerator.is_main_process
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / TRAIN_CONFIG).write_text(json.dumps(asdict(config), indent=2))
            (self.out / RECIPE_FILE).write_text(recipe_text(config, f"as run: {config.stage_command}"))
        if not resume:
            return
        self.resume()
        evaluated = [r for r in self.history if "eval" in r]
        if config.keep_best and evaluated and best_evaluation(self.history) is None:
            log.warning(
                "--keep-best: the %d earlier held-out evaluations of this run were not kept; %s/ starts with "
                "the next one",
                len(evaluated),
                BEST_DIR,
            )
        if main:  # stages are in the card, not the log
            records = (json.dumps(r) + "\n" for r in self.history if "stage" not in r)
            (self.out / LOG_FILE).write_text("".join(records))

    def _progress_bar(self) -> tqdm:
        from tqdm.auto import tqdm

        return tqdm(
            total=self.config.steps,
            initial=self.step,
            desc=f"train {self.config.mode}",
            unit="step",
            mininterval=1.0 if sys.stderr.isatty() else 30.0,
            file=sys.stderr,
        )

    def _log_step(self, record: dict, log_file: TextIO, bar: tqdm | None) -> None:
        """A step's record to the log file, the progress bar and (every 10 steps, without a terminal) the log."""
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
        if bar is not None:
            bar.update(1)
            # a resumed run's average goes on over the steps before the resume
            bar.set_postfix({**loss_postfix(self.history), "tok/s": f"{record['tokens_per_s']:.0f}"})
        if not sys.stderr.isatty() and self.step % 10 == 0:
            growth = record.get("fam_growth")
            mean, count = recent_loss(self.history)
            log.info(
                "step %d loss %.4f (mean of the last %d steps %.4f) %.0f tok/s%s",
                self.step,
                record["loss"],
                count,
                mean,
                record["tokens_per_s"],
                f", FAM growth {growth:.3f}/update" if growth is not None else "",
            )

    def _record_evaluation(self, evaluation: dict, log_file: TextIO, seconds: float) -> bool:
        """Log a held-out evaluation and keep the adapter as best/ when it beats every earlier one (whether it did)."""
        kept = self.config.keep_best and beats(evaluation, best_evaluation(self.history[:-1]))
        if kept:
            evaluation["kept_best"] = True
            self.save_best(seconds)
        log_file.write(json.dumps(evaluation) + "\n")
        log_file.flush()
        log.info(
            "step %d held-out PassKey (%d tokens, teacher-forced): %.0f%%, key log-prob %.2f",
            self.step,
            evaluation["eval"]["length"],
            100 * evaluation["eval"]["accuracy"],
            evaluation["eval"]["key_logprob"],
        )
        return kept

    def save_checkpoint(self) -> None:
        """Everything ``--resume`` needs, in ``checkpoint/`` (written atomically)."""
        save_checkpoint(
            self.out / CHECKPOINT_DIR,
            self.peft_model,
            self.prompt,
            self.optimizer,
            self.step,
            self.rng,
            self.state_passing,
            self.history,
        )

    def save_best(self, wall_seconds: float) -> None:
        """The adapter of this step in ``best/`` (written aside, then renamed: complete or the previous one)."""
        best = self.out / BEST_DIR
        tmp = best.with_name(best.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.save_adapter(wall_seconds, tmp)
        # The recipe and the log up to here too, so best/ is a run directory of its own (bench --train reads it).
        shutil.copy2(self.out / TRAIN_CONFIG, tmp / TRAIN_CONFIG)
        (tmp / LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in self.history if "stage" not in r))
        shutil.rmtree(best, ignore_errors=True)
        tmp.rename(best)
        log.info("step %d: the best held-out evaluation so far, adapter written to %s", self.step, best)

    def save_adapter(self, wall_seconds: float, directory: Path | None = None, stopped_early: bool = False) -> None:
        """The adapter and its training card, in the run directory (or ``directory``, e.g. best/)."""
        from famviz.io.adapters import write_adapter, write_training_card
        from famviz.io.models import resolve_dtype

        directory = directory or self.out
        lora_dtype = resolve_dtype(self.config.adapter_dtype) if self.config.adapter_dtype else None
        write_adapter(directory, self.loaded, self.config.fam_config(), self.prompt, self.peft_model, lora_dtype)
        write_training_card(directory, training_card(self, wall_seconds, stopped_early))


def setup_trainer(config: TrainConfig) -> tuple[Trainer, MemoryHandler]:
    """The Trainer with its model and data loaded, and a handler that kept the setup's log messages (shown on
    stderr as they came) for the run's train.log, which is created only once the setup has succeeded."""
    from logging.handlers import MemoryHandler

    famviz_log = logging.getLogger("famviz")
    setup_log = MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)  # flushed only when told
    famviz_log.addHandler(setup_log)
    try:
        return Trainer(config), setup_log
    except BaseException:
        famviz_log.removeHandler(setup_log)
        setup_log.close()  # no target: what it kept goes with the run that never started
        raise
