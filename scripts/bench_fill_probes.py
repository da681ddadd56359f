"""Time one training step with filled read-out probes (forward + backward), with the probes sharing the
rows of the stream's next block (``FamModel.finish_block``) and with a block of their own each, alternating.

    python scripts/bench_fill_probes.py [--tokens 2048] [--repeats 3]

The bundled model in bfloat16, block 256, FAM 64, fresh LoRA rank 8, one PassKey prompt with the key at
depth 0 (a filled probe after every block between the key and the question). Prints seconds per step
and tokens/s of each way, medians of the turns (docs/benchmarks.md §2).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from famviz.io.models import load_model
from famviz.training.config import TrainConfig
from famviz.training.loop import Trainer
from famviz.training.loss import collate, sequence_loss
from famviz.training.rpo_rsp import TrainingFamModel, initial_training_state

QUESTION_TOKENS = 20  # the split: question tokens asked at the end of the filled block


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            out=out,
            mode="fam",
            block_size=256,
            fam_len=64,
            mem_blocks=0,
            lora_rank=8,
            dtype="bfloat16",
            checkpoint_layers=False,
            data="passkey:1",
            passkey_tokens=f"{args.tokens}-{args.tokens}",
            passkey_depth_zero=1.0,
            readout_weight=1.0,
            readout_split=1.0,
            readout_fill=1.0,
            rsp=False,
            rpo=False,
            eval_every=0,
            device="cpu",
        )
        trainer = Trainer(config, loaded=load_model(None, dtype="bfloat16"))
        example = trainer.data.draw(random.Random(0))
        ids, weights, readout = collate([example], trainer.pad_id, "cpu")
        shared = TrainingFamModel.can_finish_blocks
        ways = {"shared rows": shared, "own block": property(lambda self: False)}
        seconds: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.repeats):
            for name, can_finish in ways.items():
                TrainingFamModel.can_finish_blocks = can_finish
                state = initial_training_state(trainer.fam_model, 1, trainer.prompt, None)
                started = time.perf_counter()
                result = sequence_loss(
                    trainer.fam_model,
                    ids,
                    weights,
                    state,
                    readout=readout,
                    readout_split=QUESTION_TOKENS,
                    readout_fill=config.block_size - QUESTION_TOKENS,
                )
                result.loss.backward()
                seconds[name].append(time.perf_counter() - started)
        TrainingFamModel.can_finish_blocks = shared
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{name}: {median:.2f} s per step, {len(example.ids) / median:.0f} tok/s (turns {values})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
