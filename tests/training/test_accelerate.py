"""Training scaled out with Accelerate, really run: two CPU processes (gloo) on a tiny random Llama."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from helpers import run_cli_in_process
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
RECIPE = [
    "--fam-growth-weight",  # its penalty is averaged over every process's FAM updates, like the tokens
    "0.5",
    "--block-size",
    "64",
    "--fam-len",
    "8",
    "--data",
    "passkey:0.5,copy:0.5",
    "--passkey-tokens",
    "90-200",
    "--copy-text-tokens",
    "100-180",
    "--copy-len",
    "32",
    "--readout-weight",
    "1",
    "--eval-every",
    "0",
    "--checkpoint-every",
    "1",
    "--threads",
    "1",
    "--lr",
    "3e-3",
    "--seed",
    "4",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_two(args, tmp_path) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        ACCELERATE_CONFIG_FILE=str(tmp_path / "no-accelerate-config.yaml"),
    )
    # Accelerate's --cpu flag starts a single process; --multi_gpu starts torch.distributed.run's processes,
    # which famviz's trainer runs as MULTI_CPU (gloo) when there is no GPU.
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "famviz",
        "train",
        *map(str, args),
    ]
    return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    weights = load_file(str(out / "adapter_model.safetensors"))
    weights.update({f"prompt.{k}": v for k, v in load_file(str(out / "fam_prompt.safetensors")).items()})
    return weights


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_global_batch_and_resume(tmp_path, capfd):
    from helpers import save_tiny_llama_dir

    model = save_tiny_llama_dir(tmp_path / "model")
    single = tmp_path / "single"
    status, _, err = run_cli_in_process(
        ["train", "--out", single, "--model", model, "--batch-size", "2", "--steps", "4", *RECIPE], capfd
    )
    assert status == 0, err

    double = tmp_path / "double"
    first = _launch_two(["--out", double, "--model", model, "--batch-size", "1", "--steps", "2", *RECIPE], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _launch_two(["--resume", double, "--steps", "4"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    losses_one = [json.loads(line)["loss"] for line in (single / "train_log.jsonl").read_text().splitlines()]
    records = [json.loads(line) for line in (double / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records] == pytest.approx(losses_one, rel=1e-4)  # the global batch's loss
    assert [r["tokens"] for r in records] == [
        json.loads(line)["tokens"] for line in (single / "train_log.jsonl").read_text().splitlines()
    ]
    # The global batch is ordered longest first on every process, so the FAM passed on (RSP) is the longest
    # row's on process 0; a step starting from one after a batch of unequal lengths is covered.
    assert all(r["lengths"] == sorted(r["lengths"], reverse=True) for r in records)
    assert any(now["rsp"] and len(set(before["lengths"])) > 1 for before, now in pairwise(records))
    one, two = _weights(single), _weights(double)
    assert one.keys() == two.keys() and len(one) > 10
    for name in one:  # the same examples, the same global loss: the same weights, to float tolerance
        torch.testing.assert_close(
            two[name].float(), one[name].float(), atol=2e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
        )
    # Only the main process writes: one record per step, one card, one adapter, one train.log.
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    log_lines = (double / "train.log").read_text().splitlines()
    assert sum("training fam" in line for line in log_lines) == 2  # the first run and the resumed one, once each
    # ... and only it logs progress and prints the run directory (the other process logs warnings only)
    for run in (first, resumed):
        assert run.stderr.count("training fam") == 1, run.stderr[-3000:]
        assert run.stdout.splitlines().count(str(double)) == 1, run.stdout
    card = json.loads((double / "training_card.json").read_text())
    assert card["steps"] == 4 and card["hardware"].startswith("2 processes")
