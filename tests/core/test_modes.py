"""The mode table: what each shipped mode reads and attends to, and that one new row is all a combined mode needs."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from helpers import REPO_ROOT

from famviz.core.config import MODES, FamConfig
from famviz.core.modes import BLOCK_GROUPS, MODE_TABLE, mode_names


def test_the_table_is_the_modes():
    assert MODES == tuple(MODE_TABLE) == ("fam", "bswa", "sink", "full")
    assert mode_names("trainable") == ("fam", "bswa")
    assert mode_names("baseline") == ("bswa", "sink", "full")


@pytest.mark.parametrize(
    ("name", "options", "groups"),
    [
        ("fam", ("block_size", "mem_blocks", "fam_len", "fam_norm"), ("fam", "memory", "block")),
        ("bswa", ("block_size", "mem_blocks"), ("memory", "block")),
        ("sink", ("block_size", "mem_blocks", "sink_tokens"), ("memory", "block", "sink")),
        ("full", ("block_size",), ("memory", "block")),
    ],
)
def test_each_mode_reads_its_settings_and_attends_to_its_groups(name, options, groups):
    row = MODE_TABLE[name]
    assert row.options == options and row.groups == groups
    assert set(row.groups) <= set(BLOCK_GROUPS)


def test_records_keep_only_the_settings_a_mode_reads():
    """The records written before the table existed read the same: sink_tokens in sink mode only, fam_norm only
    when it is not the default."""
    assert FamConfig("fam", 256, 64, 0).to_dict() == {"mode": "fam", "block_size": 256, "fam_len": 64, "mem_blocks": 0}
    assert FamConfig("sink", 256, 0, 1, sink_tokens=4).to_dict()["sink_tokens"] == 4
    assert "fam_norm" in FamConfig("fam", 256, 64, 0, fam_norm="keep").to_dict()
    assert "fam_norm" not in FamConfig("bswa", 256, 0, 0, fam_norm="keep").to_dict()


def test_tags_and_descriptions_name_the_memory_of_bounded_modes_only():
    assert (MODE_TABLE["fam"].tag(0), MODE_TABLE["bswa"].tag(1), MODE_TABLE["full"].tag(3)) == ("fam0", "bswa1", "full")
    assert MODE_TABLE["sink"].describe(0) == "sink (mem 0)" and MODE_TABLE["full"].describe(2) == "full"


def test_geometry_words_follow_the_mode():
    assert FamConfig("fam", 256, 64, 1).geometry() == ["block 256", "memory blocks 1", "FAM 64"]
    assert FamConfig("sink", 256, 64, 0, sink_tokens=4).geometry() == ["block 256", "memory blocks 0", "sink tokens 4"]
    assert FamConfig("full", 256).geometry() == ["block 256"]


# A combined mode, FAM plus attention sinks, added the way docs/architecture.md says: one row, before anything
# else of famviz is imported. Every front end and the engine must then know it.
NEW_ROW = """
import famviz.core.modes as modes

modes.MODE_TABLE["famsink"] = modes.Mode(
    "famsink", "FAM with attention sinks", "FAM plus the stream's first tokens", fam=True, sinks=True
)
"""

CHECKS = """
import sys

import numpy as np
import torch

from famviz.app.passkey_tab import MODE_CHOICES
from famviz.cli import build_parser
from famviz.core.config import MODES, FamConfig
from famviz.core.engine import Stream
from famviz.core.modes import BLOCK_GROUPS
from famviz.viz.figures import default_view, missing_view
sys.path.insert(0, "tests")
from helpers import tiny_loaded

assert "famsink" in MODES
args = build_parser().parse_args(["stream", "doc.txt", "--mode", "famsink"])
assert args.mode == "famsink"
assert ("FAM with attention sinks, no memory blocks", "famsink:0") in MODE_CHOICES
config = FamConfig("famsink", 8, 4, 0, sink_tokens=3)
assert config.to_dict()["sink_tokens"] == 3 and config.geometry()[-2:] == ["FAM 4", "sink tokens 3"]
assert default_view(config) == "block-fam" and missing_view(config, "block-sink") is None

loaded = tiny_loaded()
ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(0)).tolist()
share = Stream(loaded, config).run(ids).trace.array("block.share")
np.testing.assert_allclose(share.sum(-1), 1, atol=1e-5)
assert (share[1:, ..., BLOCK_GROUPS.index("sink")] > 0).all() and (share[..., BLOCK_GROUPS.index("fam")] > 0).all()
no_sinks = Stream(loaded, FamConfig("famsink", 8, 4, 0, sink_tokens=0)).run(ids).nll
np.testing.assert_allclose(no_sinks, Stream(loaded, FamConfig("fam", 8, 4, 0)).run(ids).nll, atol=1e-5, equal_nan=True)
print("famsink ok")
"""


def test_one_new_row_adds_a_combined_mode_everywhere():
    """The CLI's choices, the app's sweep columns, the records, the figures' views and the engine all read the
    table: FAM with sinks runs, its shares sum to one with both FAM and sinks read, and without sinks it is fam."""
    script = textwrap.dedent(NEW_ROW) + textwrap.dedent(CHECKS)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "famsink ok" in done.stdout
