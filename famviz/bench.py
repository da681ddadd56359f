"""``python -m famviz bench``: how fast and how flat streaming is, measured side by side in one run.

Every speed and memory figure comes from one process: the ratios compare runs made in the same minute,
repeated in alternation (A B A B ...) and summarised by their medians, because the machines this
runs on are shared and noisy. ``run_bench`` returns one flat dict (the ``--json`` object);
``famviz.commands.bench`` prints it with the targets.

Figures (fam = block 256, fam_len 64, mem_blocks 1, trace recorded in its compact form unless stated):

- ``fam_vs_full``: fam tokens/s ÷ the model's own forward (one call, SDPA, same dtype) on the same document;
- ``mfu``: 2 × parameters × fam tokens/s ÷ the matrix-multiply FLOP/s in the model's dtype, same run;
- ``memory_growth``: peak RSS streaming the large document ÷ streaming the small one (16× fewer tokens);
- ``trace_on_vs_off``, ``fam_vs_bswa``: time ratios on the small document;
- ``probe_vs_block``: one live PassKey probe (question + greedy answer on a fork of the state) ÷ one block;
- ``growth``: time for the large document ÷ (16 × time for the small one); 1.0 is linear.
"""

from __future__ import annotations

import gc
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from famviz.core.config import FamConfig

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

    from famviz.core.engine import StreamResult
    from famviz.core.fam_model import FamModel
    from famviz.core.model import LoadedModel
    from famviz.training.config import TrainConfig
    from famviz.training.data import Example
    from famviz.training.loop import Trainer

TARGETS = {  # figure: (comparison, target)
    "fam_vs_full": (">=", 2.0),
    "mfu": (">=", 0.50),
    "memory_growth": ("<=", 1.10),
    "trace_on_vs_off": ("<=", 1.10),
    "fam_vs_bswa": ("<=", 1.30),
    "probe_vs_block": ("<=", 0.5),
    "growth": ("<=", 1.05),
}


@dataclass(frozen=True)
class BenchSizes:
    """Document lengths and repeats; ``FULL`` is the issue's setting, ``QUICK`` a few minutes' version."""

    compare_tokens: int = 16384  # fam vs the model's own full forward
    small_tokens: int = 4096  # trace on/off, fam/bswa, and the small side of growth and memory
    growth_factor: int = 16  # the large document is growth_factor × small_tokens
    matmul_size: int = 2048
    repeats: int = 3  # alternating repeats of each comparison (the large document runs once)
    block_size: int = 256
    fam_len: int = 64
    mem_blocks: int = 1


FULL = BenchSizes()
QUICK = BenchSizes(compare_tokens=2048, small_tokens=1024, repeats=2, matmul_size=1024)


# -- measuring helpers ---------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """Wall seconds and process CPU seconds of ``fn``."""
    _sync(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - started, time.process_time() - cpu_started


class Timings(NamedTuple):
    """Median seconds of each run: ``wall`` clock, and process ``cpu`` time (on a shared machine CPU time
    does not count the time spent waiting for a core, so its ratios are the steadier companions)."""

    wall: dict[str, float]
    cpu: dict[str, float]


def alternate(runs: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> Timings:
    """Each run's median seconds, the runs taken in turn ``repeats`` times (noise hits all alike)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu_times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            wall, cpu = _timed(fn, device)
            times[name].append(wall)
            cpu_times[name].append(cpu)
    return Timings(
        {name: statistics.median(values) for name, values in times.items()},
        {name: statistics.median(values) for name, values in cpu_times.items()},
    )


def _reset_peak(device: torch.device) -> None:
    from famviz.process import reset_window_peak_rss, trim_heap

    gc.collect()
    trim_heap()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_window_peak_rss()


def _peak_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    from famviz.process import window_peak_rss_mb

    return window_peak_rss_mb()


def document_ids(loaded: LoadedModel, n_tokens: int) -> list[int]:
    """``n_tokens`` of English text (the GPL-3 licence tiled), or random ids for a model without tokenizer."""
    vocab = loaded.config.vocab_size
    path = "/usr/share/common-licenses/GPL-3"
    if loaded.tokenizer is not None and os.path.exists(path):
        from famviz.core.tokenize import tokenize_document

        with open(path, encoding="utf-8") as handle:
            base = tokenize_document(loaded.tokenizer, handle.read())[0]
    else:
        base = torch.randint(0, vocab, (4096,), generator=torch.Generator().manual_seed(0)).tolist()
    return (base * (n_tokens // len(base) + 1))[:n_tokens]


# -- the benchmark -------------------------------------------------------------------------------------
def _stream(model: FamModel, ids: list[int], record: bool = True) -> StreamResult:
    from famviz.core.engine import Stream

    return Stream(model, record=record, compact_trace=True).run(ids)


def run_bench(
    loaded: LoadedModel, sizes: BenchSizes = FULL, progress: Callable[[str], None] = lambda message: None
) -> dict:
    """Measure every figure on ``loaded`` (a ``famviz.LoadedModel``); returns one flat dict."""
    from famviz.core.fam_model import FamModel
    from famviz.process import steady_heap

    heap = steady_heap() if loaded.device.type == "cpu" else False  # RSS otherwise creeps with glibc's heap
    fam_model = FamModel(loaded, FamConfig("fam", sizes.block_size, sizes.fam_len, sizes.mem_blocks))
    bswa_model = FamModel(loaded, FamConfig("bswa", sizes.block_size, 0, sizes.mem_blocks))
    small_ids = document_ids(loaded, sizes.small_tokens)
    figures = _machine_figures(loaded, sizes)
    figures["steady_heap"] = heap
    progress("warming up")
    _stream(fam_model, small_ids[: 2 * sizes.block_size])
    _stream(bswa_model, small_ids[: 2 * sizes.block_size])
    _stream(fam_model, small_ids[: 2 * sizes.block_size], record=False)

    progress(f"growth: {sizes.small_tokens} and {sizes.small_tokens * sizes.growth_factor} tokens, peak memory")
    figures.update(_growth_figures(fam_model, sizes))
    if heap:
        # Speed figures on glibc's usual heap: the 64 KB mmap threshold that keeps RSS flat costs a page
        # fault per large tensor (measured: 1m40 s of system time in a 3 min quick bench).
        steady_heap(32 * 2**20)
    progress(f"fam vs the model's own forward on {sizes.compare_tokens} tokens")
    figures.update(_fam_vs_full_figures(fam_model, sizes, figures["parameters"]))
    progress(f"trace on / off and fam / bswa on {sizes.small_tokens} tokens")
    figures.update(_trace_figures(fam_model, bswa_model, small_ids, sizes))
    progress("one live PassKey probe")
    figures.update(_probe_figures(fam_model, small_ids, sizes, loaded.device))
    figures["checks"] = {name: _meets(figures.get(name), *target) for name, target in TARGETS.items()}
    return figures


def _machine_figures(loaded: LoadedModel, sizes: BenchSizes) -> dict:
    """What the figures were measured on: the model, its dtype and device, the threads, CPU and sizes."""
    return {
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "model": loaded.name,
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "sizes": asdict(sizes),
    }


def _growth_figures(fam_model: FamModel, sizes: BenchSizes) -> dict:
    """Time and peak memory of the small document (median of its runs) against the large one (run once),
    the per-block time at the large one's end against its start, and the trace's and state's sizes."""
    device = fam_model.device
    small_ids = document_ids(fam_model.loaded, sizes.small_tokens)
    large_ids = document_ids(fam_model.loaded, sizes.small_tokens * sizes.growth_factor)
    figures: dict = {}
    small_times, small_cpu_times, small_peaks, results = [], [], [], {}
    large_time = large_cpu = large_peak = None

    def kept(name: str, ids: list[int]) -> None:
        # the stream's result stays alive until its peak is read, as a user's would
        results[name] = _stream(fam_model, ids)

    for turn in range(max(2, sizes.repeats)):  # small, large, small[, small]: the large run once
        _reset_peak(device)
        wall, cpu = _timed(lambda: kept("small", small_ids), device)
        small_times.append(wall)
        small_cpu_times.append(cpu)
        small_peaks.append(_peak_mb(device))
        if turn == 0:
            figures["trace_mb_small"] = results["small"].trace.nbytes() / 2**20
            results.clear()
            _reset_peak(device)
            large_time, large_cpu = _timed(lambda: kept("large", large_ids), device)
            blocks = results["large"].block_seconds
            quarter = max(1, len(blocks) // sizes.growth_factor)  # as many blocks as the small document has
            end, start = statistics.median(blocks[-quarter:]), statistics.median(blocks[1 : quarter + 1])
            figures["growth_per_block"] = end / start
            large_peak = _peak_mb(device)
            figures["trace_mb_large"] = results["large"].trace.nbytes() / 2**20
            figures["state_mb"] = results["large"].state_bytes / 2**20
        results.clear()
    small_time, small_cpu = statistics.median(small_times), statistics.median(small_cpu_times)
    small_peak = max((p for p in small_peaks if p is not None), default=None)
    return figures | {
        "small_s": small_time,
        "large_s": large_time,
        "growth": large_time / (sizes.growth_factor * small_time),
        "growth_cpu": large_cpu / (sizes.growth_factor * small_cpu),
        "peak_small_mb": small_peak,
        "peak_large_mb": large_peak,
        "memory_growth": large_peak / small_peak if small_peak and large_peak else None,
    }


def _fam_vs_full_figures(fam_model: FamModel, sizes: BenchSizes, n_params: int) -> dict:
    """The fam stream against the model's own forward over the whole document and against square matrix
    products in the model's dtype, taken in turns (model FLOP utilisation)."""
    loaded, device = fam_model.loaded, fam_model.device
    compare_ids = document_ids(loaded, sizes.compare_tokens)
    a = torch.randn(sizes.matmul_size, sizes.matmul_size, device=device, dtype=loaded.dtype)
    b = torch.randn(sizes.matmul_size, sizes.matmul_size, device=device, dtype=loaded.dtype)
    a @ b
    matmuls = 8

    def matmul() -> None:
        for _ in range(matmuls):
            a @ b

    whole = torch.tensor([compare_ids], device=device)

    @torch.inference_mode()
    def own_forward() -> torch.Tensor:
        return loaded.model(whole).logits  # one call over the whole document, every position's logits

    with torch.inference_mode():
        loaded.model(torch.tensor([compare_ids[: sizes.block_size]], device=device))
    # the matrix multiplies take turns with the runs: MFU compares like with like
    runs = {"fam": lambda: _stream(fam_model, compare_ids), "full": own_forward, "matmul": matmul}
    times, cpu = alternate(runs, sizes.repeats, device)
    flops = matmuls * 2 * sizes.matmul_size**3 / times["matmul"]
    fam_rate = sizes.compare_tokens / times["fam"]
    whole = None  # frees the document-long input before the next measurements
    gc.collect()
    return {
        "matmul_gflops": flops / 1e9,
        "fam_vs_full_cpu": cpu["full"] / cpu["fam"],
        "fam_tokens_per_s": fam_rate,
        "full_forward_tokens_per_s": sizes.compare_tokens / times["full"],
        "fam_vs_full": times["full"] / times["fam"],
        "mfu": 2 * n_params * fam_rate / flops,
    }


def _trace_figures(fam_model: FamModel, bswa_model: FamModel, ids: list[int], sizes: BenchSizes) -> dict:
    """The fam stream with its trace recorded, against no trace and against BSWA (recorded), in turns."""
    runs = {
        "on": lambda: _stream(fam_model, ids),
        "off": lambda: _stream(fam_model, ids, record=False),
        "bswa": lambda: _stream(bswa_model, ids),
    }
    times, cpu = alternate(runs, sizes.repeats, fam_model.device)
    return {
        "trace_on_vs_off_cpu": cpu["on"] / cpu["off"],
        "fam_vs_bswa_cpu": cpu["on"] / cpu["bswa"],
        "trace_on_s": times["on"],
        "trace_off_s": times["off"],
        "bswa_s": times["bswa"],
        "trace_on_vs_off": times["on"] / times["off"],
        "fam_vs_bswa": times["on"] / times["bswa"],
    }


def _probe_figures(fam_model: FamModel, ids: list[int], sizes: BenchSizes, device: torch.device) -> dict:
    """Time of one block and of one live probe from the state after ``ids`` (None without famviz.probes.passkey)."""
    from famviz.core.engine import Stream

    stream = Stream(fam_model, record=True, compact_trace=True)
    stream.feed(ids[: (len(ids) // sizes.block_size) * sizes.block_size])
    block_s = statistics.median(stream.result().block_seconds[1:] or stream.result().block_seconds)
    figures = {"block_s": block_s, "probe_s": None, "probe_vs_block": None, "probe_note": None}
    try:
        from famviz.probes.passkey import live_probe
    except ImportError as exc:
        figures["probe_note"] = f"no live probe: {exc}"
        return figures
    if fam_model.loaded.tokenizer is None:
        figures["probe_note"] = "no live probe: the model has no tokenizer"
        return figures
    live_probe(fam_model, stream.state, 12345)  # warm-up
    probe_times = [_timed(lambda: live_probe(fam_model, stream.state, 12345), device)[0] for _ in range(sizes.repeats)]
    figures["probe_s"] = statistics.median(probe_times)
    figures["probe_vs_block"] = figures["probe_s"] / block_s
    return figures


def _meets(value: float | None, comparison: str, target: float) -> bool | None:
    if value is None:
        return None
    return value >= target if comparison == ">=" else value <= target


# -- training against inference (``bench --train``) ------------------------------------------------------
@dataclass(frozen=True)
class TrainBenchSizes:
    steps: int = 8  # training steps per turn (the same examples every turn)
    stream_tokens: int = 4096  # the fam inference stream of each turn
    repeats: int = 3


TRAIN_QUICK = TrainBenchSizes(steps=4, stream_tokens=2048, repeats=2)
TRAIN_TARGET = 0.4  # training tokens/s ÷ fam inference stream tokens/s


class _FixedExamples:
    """The same training examples, in turn (the bench's data: every turn trains on the same tokens)."""

    def __init__(self, examples: Iterable[Example]):
        self.examples, self.next = list(examples), 0

    def draw(self, rng: random.Random) -> Example:
        example = self.examples[self.next % len(self.examples)]
        self.next += 1
        return example


def recipe_config(
    recipe_dir: str | Path, out: str, model: str | None, device: str, dtype: str
) -> tuple[TrainConfig, bool]:
    """The training configuration of an adapter directory's run (its ``train_config.json``), for benchmarking."""
    import json
    from dataclasses import replace
    from pathlib import Path

    from famviz.training.config import TRAIN_CONFIG, TrainConfig

    path = Path(recipe_dir) / TRAIN_CONFIG
    config = TrainConfig.from_dict(json.loads(path.read_text())) if path.is_file() else TrainConfig(out=out)
    return replace(
        config,
        out=out,
        model=model,
        device=device,
        dtype=dtype,
        init_from=None,
        eval_every=0,  # no held-out evaluations, so nothing to keep the best of
        keep_best=False,
        max_minutes=None,
        threads=None,
        steps=10**9,
        checkpoint_every=10**9,
    ), path.is_file()


def run_train_bench(
    model: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    sizes: TrainBenchSizes = TrainBenchSizes(),
    recipe_dir: str | Path | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> dict:
    """Training tokens/s of the shipped recipe against the fam inference stream's tokens/s, one process,
    turns taken in alternation (train, stream, train, ...), medians of the turns.

    Training: the recipe's ``train_config.json`` (geometry, LoRA rank, data mixture, read-out probes, layer
    recompute, the curriculum stage the adapter reached), on ``steps`` examples drawn once from its mixture.
    Inference: the same geometry streamed over GPL-3 with the trace recorded, as the app streams, on a
    second copy of the model without LoRA (the app merges an adapter, so its speed is the untuned one's).
    """
    import tempfile

    from famviz.core.fam_model import FamModel
    from famviz.io.adapters import SHIPPED_ADAPTER
    from famviz.io.models import load_model

    recipe_dir = recipe_dir or SHIPPED_ADAPTER
    with tempfile.TemporaryDirectory(prefix="famviz-bench-train-") as out:
        config, from_recipe = recipe_config(recipe_dir, out, model, device, dtype)
        progress(f"loading two copies of the model ({dtype})")
        loaded = load_model(model, device=device, dtype=dtype)
        trainer, examples = _bench_trainer(config, loaded, recipe_dir if from_recipe else None, sizes)
        streamed = load_model(model, device=device, dtype=dtype)
        fam_model = FamModel(streamed, config.fam_config())
        ids = document_ids(streamed, sizes.stream_tokens)
        turn_tokens: list[int] = []  # tokens trained in each turn, read after its timing

        def train_turn() -> None:
            turn_tokens.append(sum(trainer.train_step()["tokens"] for _ in range(sizes.steps)))

        progress("warming up")
        trainer.train_step()
        _stream(fam_model, ids[: 2 * config.block_size])
        train_rates, stream_rates = [], []
        for turn in range(sizes.repeats):
            progress(
                f"turn {turn + 1} of {sizes.repeats}: {sizes.steps} training steps, "
                f"then {sizes.stream_tokens} tokens streamed"
            )
            seconds, _ = _timed(train_turn, streamed.device)
            train_rates.append(turn_tokens[-1] / seconds)
            stream_seconds, _ = _timed(lambda: _stream(fam_model, ids), streamed.device)
            stream_rates.append(sizes.stream_tokens / stream_seconds)
    train_rate, stream_rate = statistics.median(train_rates), statistics.median(stream_rates)
    return {
        "model": streamed.name,
        "device": str(streamed.device),
        "dtype": str(streamed.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "recipe": str(recipe_dir) if from_recipe else "TrainConfig defaults (no train_config.json found)",
        "fam": config.fam_config().to_dict(),
        "lora_rank": config.lora_rank,
        "data": config.data,
        "readout_weight": config.readout_weight,
        "checkpoint_layers": config.checkpoint_layers,
        "curriculum_blocks": trainer.curriculum_blocks,
        "training_tokens_per_turn": sum(len(e.ids) for e in examples),
        "sizes": asdict(sizes),
        "train_tokens_per_s": train_rate,
        "stream_tokens_per_s": stream_rate,
        "train_vs_stream": train_rate / stream_rate,
        "target": TRAIN_TARGET,
        "met": train_rate / stream_rate >= TRAIN_TARGET,
        "turns": {"train_tokens_per_s": train_rates, "stream_tokens_per_s": stream_rates},
    }


def _bench_trainer(
    config: TrainConfig, loaded: LoadedModel, recipe_dir: str | Path | None, sizes: TrainBenchSizes
) -> tuple[Trainer, list[Example]]:
    """A trainer of the recipe at the curriculum stage its adapter (``recipe_dir``, if any) reached, set to
    train on the same ``sizes.steps`` examples (drawn once from the recipe's mixture) every turn."""
    from famviz.io.adapters import read_training_card
    from famviz.training.loop import Trainer

    trainer = Trainer(config, loaded=loaded)
    card = read_training_card(recipe_dir) if recipe_dir is not None else {}
    reached = (card.get("data_mixture") or {}).get("curriculum_reached_blocks")
    if reached and reached in trainer.stages:
        trainer.stage = trainer.stages.index(reached)
    trainer.apply_curriculum()
    examples = [trainer.data.draw(random.Random(seed)) for seed in range(sizes.steps)]
    trainer.data = _FixedExamples(examples)
    return trainer, examples
