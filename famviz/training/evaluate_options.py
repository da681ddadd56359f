"""The `famviz evaluate` command's options and sizes: light (no torch), so that the command line parses and
answers ``--help`` without loading the library; the evaluation itself is ``famviz.training.evaluation``."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from famviz.core.config import FAM_NORMS, LIMITS, TOOL_DEFAULTS, FamConfig  # light: no torch

MIN_LONG_TOKENS = 1024
CORPUS_DOCUMENTS = 2  # held-out documents of a corpus used for the long-document check


@dataclass(frozen=True)
class Sizes:
    """How much `famviz evaluate` runs. ``lengths`` None: the shortest PassKey prompt whose key only the FAM
    can carry, (memory blocks + 2) blocks; ``long_documents`` None: every default long document."""

    modes: str
    lengths: str | None
    depths: str
    trials: int
    long_tokens: int
    norm_after_blocks: str
    windows: int  # in-window loss: windows of one block each
    long_documents: int | None


FULL = Sizes("fam,bswa,full", "2048,4096,8192", "0", 50, 8192, "4,64", 8, None)
# A smoke check in about 1.5 minutes on a 2-core CPU with the bundled model (87 s, AVX2 EPYC, float32): a few
# keys at one short length, one short held-out document, the FAM norm within it. Its figures are noisy: look
# at them, do not report them.
QUICK = Sizes("fam,bswa", None, "0", 5, MIN_LONG_TOKENS, "4", 4, 1)
SIZED_OPTIONS = ("modes", "lengths", "depths", "trials", "long_tokens", "norm_after_blocks")
MIN_PASSKEY_LENGTH = 64


def sizes_for(args: argparse.Namespace, config: FamConfig) -> Sizes:
    """The sizes of this run: --quick's or the full check's, with every option given explicitly kept."""
    chosen = QUICK if getattr(args, "quick", False) else FULL
    if chosen.lengths is None:
        chosen = dataclasses.replace(chosen, lengths=str((config.mem_blocks + 2) * config.block_size))
    given = {name: getattr(args, name) for name in SIZED_OPTIONS if getattr(args, name, None) is not None}
    if args.document and chosen.long_documents is not None:
        given["long_documents"] = None  # documents named explicitly are all read
    return dataclasses.replace(chosen, **given)


def _limits_help(name: str) -> str:
    low, high = LIMITS[name]
    return f"{low:,}…{high:,}"


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "adapter",
        nargs="?",
        default=None,
        metavar="ADAPTER_DIR",
        help="the adapter to evaluate (its training card is left unchanged unless --write-card); "
        "none: the untuned conversion",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke check, about 1.5 minutes on a 2-core CPU, instead of the full one (an hour or more there): "
        f"modes {QUICK.modes}, PassKey at (memory blocks + 2) blocks (512 tokens for block 256, no memory), "
        f"depth {QUICK.depths}, {QUICK.trials} keys per cell, {QUICK.windows} in-window windows, one long "
        f"document (GPL-3, or the first of the corpus's held-out split) of {QUICK.long_tokens:,} tokens, FAM "
        f"norm after {QUICK.norm_after_blocks} blocks; options given explicitly still apply. Noisy: to look "
        "at, not to report",
    )
    parser.add_argument(
        "--write-card",
        action="store_true",
        help="also record the results in ADAPTER_DIR's training card (training_card.json and TRAINING_CARD.md); "
        "default: they are only printed",
    )
    parser.add_argument(
        "--model", default=None, help="Hugging Face model id or local path (default: bundled SmolLM2-135M)"
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads, at least 1")
    parser.add_argument(
        "--block-size",
        type=int,
        default=None,
        metavar="N",
        help=f"{_limits_help('block_size')}; default: the adapter's (else {TOOL_DEFAULTS.block_size})",
    )
    parser.add_argument(
        "--fam-len",
        type=int,
        default=None,
        metavar="N",
        help=f"{_limits_help('fam_len')}; default: the adapter's (else {TOOL_DEFAULTS.fam_len})",
    )
    parser.add_argument(
        "--fam-norm",
        choices=FAM_NORMS,
        default=None,
        help="grow (the paper's) or keep (each FAM slot rescaled to its norm before the update); "
        "default: the adapter's, else grow",
    )
    parser.add_argument(
        "--mem-blocks",
        type=int,
        default=None,
        metavar="N",
        help=f"{_limits_help('mem_blocks')}; default: the adapter's (else 0, the paper's PassKey setting)",
    )
    parser.add_argument(
        "--modes",
        default=None,
        metavar="LIST",
        help="PassKey modes, all on the same keys; MODE:N sets memory blocks, N "
        f"{_limits_help('mem_blocks')} (default: --mem-blocks); default {FULL.modes}, --quick {QUICK.modes}",
    )
    parser.add_argument(
        "--lengths",
        default=None,
        metavar="LIST",
        help=f"PassKey prompt lengths in tokens, each at least {MIN_PASSKEY_LENGTH} (no upper limit: time grows "
        f"with length); default {FULL.lengths}, --quick (memory blocks + 2) × block size",
    )
    parser.add_argument(
        "--depths", default=None, metavar="LIST", help=f"PassKey key depths, each 0…1; default {FULL.depths}"
    )
    parser.add_argument(
        "--trials",
        type=int,
        default=None,
        metavar="N",
        help=f"PassKey keys per cell, at least 1; default {FULL.trials}, --quick {QUICK.trials}",
    )
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="PassKey keys' seed, any integer; default 0")
    parser.add_argument("--skip-passkey", action="store_true", help="only the loss checks")
    parser.add_argument(
        "--document",
        action="append",
        default=None,
        metavar="PATH",
        help=f"a held-out long document of at least {MIN_LONG_TOKENS:,} tokens (repeatable; default: GPL-3 and "
        "pydoc text)",
    )
    parser.add_argument(
        "--corpus",
        action="append",
        default=None,
        metavar="PATH",
        help=f"long documents from this corpus's held-out split, the first {CORPUS_DOCUMENTS} (--quick: 1) of "
        f"at least {MIN_LONG_TOKENS:,} tokens (as `train --corpus`; default for an adapter trained on a corpus, "
        "unless --document is given)",
    )
    parser.add_argument(
        "--long-tokens",
        type=int,
        default=None,
        metavar="N",
        help=f"tokens of each long document: 0 (no long-document check) or at least {MIN_LONG_TOKENS:,} "
        f"(a shorter document is used whole); default {FULL.long_tokens:,}, --quick {QUICK.long_tokens:,}",
    )
    parser.add_argument(
        "--norm-after-blocks",
        default=None,
        metavar="LIST",
        help="the evaluated FAM's norm after these blocks, each at least 1 (a long document is streamed again, "
        f"repeated, past its end; the tuned stream's time grows with the largest); default {FULL.norm_after_blocks}, "
        f"--quick {QUICK.norm_after_blocks}",
    )
    parser.add_argument(
        "--sink-tokens",
        type=int,
        default=TOOL_DEFAULTS.sink_tokens,
        metavar="S",
        help="tokens the sink baselines keep for ever (PassKey mode sink, the long documents' untuned sink row), "
        f"{_limits_help('sink_tokens')}; default {TOOL_DEFAULTS.sink_tokens}",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument(
        "--figure", default=None, metavar="OUT", help="the PassKey grid as a heatmap (.png, .svg, .pdf, .html)"
    )
