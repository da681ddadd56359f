"""Paper-ready export (famviz/viz/export.py) and `python -m famviz export`, on a hand-built trace (no model)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from test_figures import _fam_trace  # tests/ is on sys.path under pytest

from famviz.cli import main as cli_main
from famviz.errors import FamvizError
from famviz.viz import export
from famviz.viz.inspector import Run

needs_browser = pytest.mark.skipif(
    export.static_export_problem() is not None, reason="no Chromium for kaleido on this machine"
)


@pytest.fixture()
def trace_file(tmp_path):
    trace = _fam_trace(blocks=5)
    trace.meta["document"] = "notes.txt"
    return trace.save(tmp_path / "run.npz")


def _metadata_from_html(page: str) -> dict:
    import html

    content = re.search(r'<meta name="famviz-metadata" content="([^"]*)">', page).group(1)
    return json.loads(html.unescape(content))


@pytest.mark.parametrize("name", list(export.FIGURES))
def test_every_figure_exports_as_self_contained_html(trace_file, tmp_path, name):
    out = export.export_trace_file(trace_file, name, "html", tmp_path / f"{name}.html")
    page = out.read_text()
    assert not re.search(r"<script[^>]*\bsrc=", page)  # no external scripts: plotly.js is inside the file
    assert len(page) > 1_000_000
    meta = _metadata_from_html(page)
    assert meta["figure"] == name and meta["config"]["block_size"] == 5 and meta["model"] == "tiny"
    assert "notes.txt" in meta["caption"] and "FAM 3" in meta["caption"]


def test_publication_styling_is_a_fixed_size_copy_with_a_caption():
    run = Run.from_trace(_fam_trace(), "t.npz")
    fig = run.heatmap()
    styled = export.publication_figure(fig, run.caption(), (800, 500))
    assert (styled.layout.width, styled.layout.height, styled.layout.autosize) == (800, 500, False)
    assert styled.layout.font.size >= 14
    assert "FAM 3" in styled.layout.annotations[-1].text
    assert fig.layout.width is None  # the app's own figure is untouched
    assert styled.data[0].colorbar.title.text == fig.data[0].colorbar.title.text


def test_long_captions_wrap():
    caption = " · ".join(f"part number {i}" for i in range(12))
    wrapped = export._wrap(caption, 40)
    assert wrapped.count("<br>") >= 3 and all(len(line) <= 40 for line in wrapped.split("<br>"))


def test_without_a_browser_html_still_works_and_static_formats_say_why(monkeypatch, trace_file, tmp_path):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chromium"))
    problem = export.static_export_problem()
    assert problem and "Chromium" in problem and "HTML export works" in problem
    with pytest.raises(export.ExportError, match="Chromium"):
        export.export_trace_file(trace_file, "heatmap", "svg", tmp_path / "h.svg")
    assert not (tmp_path / "h.svg").exists()
    assert export.export_trace_file(trace_file, "heatmap", "html", tmp_path / "h.html").stat().st_size > 0


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(name="nope"), "unknown figure"),
        (dict(fmt="jpeg"), "unknown export format"),
        (dict(view="sideways"), "unknown view"),
        (dict(block=99), "not in the trace"),
        (dict(method="tSNE"), "unknown trajectory method"),
    ],
)
def test_bad_export_requests_are_clear_messages(trace_file, tmp_path, kwargs, words):
    args = dict(name="heads", fmt="html", view=None, block=None, method="PCA")
    args.update(kwargs)
    with pytest.raises(FamvizError, match=words):
        export.export_trace_file(
            trace_file,
            args["name"],
            args["fmt"],
            tmp_path / "out.html",
            view=args["view"],
            block=args["block"],
            method=args["method"],
        )


def test_unwritable_and_missing_paths(trace_file, tmp_path):
    with pytest.raises(FamvizError, match="does not exist"):
        export.export_trace_file(trace_file, "nll", "html", tmp_path / "missing" / "nll.html")
    with pytest.raises(FamvizError, match="does not exist"):
        export.export_trace_file(tmp_path / "none.npz", "nll", "html", tmp_path / "nll.html")


def test_a_figure_with_nothing_to_draw_is_refused(tmp_path):
    from test_figures import _trace

    from famviz.core.trace import Trace

    trace = _trace(fam=False)
    trace.meta.update(config={"mode": "bswa", "block_size": 4, "fam_len": 0, "mem_blocks": 1})
    path = trace.save(tmp_path / "bswa.npz")
    with pytest.raises(FamvizError, match="nothing to draw.*fam mode"):
        export.export_trace_file(path, "trajectory", "html", tmp_path / "t.html")
    assert Trace.load(path).n_blocks == 3


# -- static formats (need Debian's chromium) ------------------------------------------------------------------
@needs_browser
@pytest.mark.slow
def test_static_formats(trace_file, tmp_path):
    svg = export.export_trace_file(trace_file, "heatmap", "svg", tmp_path / "h.svg").read_text()
    assert svg.lstrip().startswith("<svg") and "<metadata>" in svg and "layer" in svg and "block" in svg
    assert "share on" in svg  # the colour bar is labelled
    png = export.export_trace_file(trace_file, "nll", "png", tmp_path / "n.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == tuple(2 * v for v in export.FIGURES["nll"].size)  # PNG at scale 2
    pdf = export.export_trace_file(trace_file, "dynamics", "pdf", tmp_path / "d.pdf").read_bytes()
    assert pdf.startswith(b"%PDF")


# -- the command line ------------------------------------------------------------------------------------------
def test_cli_help_lists_the_figures(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["export", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in export.FIGURES:
        assert name in text
    for option in ("--figure", "--format", "--out"):
        assert option in text


def test_cli_export_writes_the_file(trace_file, tmp_path, capsys):
    out = tmp_path / "heads.html"
    assert (
        cli_main(
            [
                "export",
                str(trace_file),
                "--figure",
                "heads",
                "--format",
                "html",
                "--out",
                str(out),
                "--block",
                "2",
                "--layer",
                "1",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == str(out)
    assert _metadata_from_html(out.read_text())["block"] == 2


def test_cli_export_errors_exit_2_with_one_line(trace_file, tmp_path, capsys):
    assert cli_main(["export", str(tmp_path / "none.npz"), "--figure", "nll", "--out", str(tmp_path / "a.html")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("famviz: error:") and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["export", str(trace_file), "--figure", "bogus", "--out", str(tmp_path / "a.html")])
    assert exit_info.value.code == 2


@needs_browser
@pytest.mark.slow
def test_cli_export_svg_from_the_suffix(trace_file, tmp_path):
    out = tmp_path / "traj.svg"
    assert cli_main(["export", str(trace_file), "--figure", "trajectory", "--out", str(out)]) == 0
    assert out.read_text().lstrip().startswith("<svg")
    np.testing.assert_equal(out.stat().st_size > 1000, True)


def test_cli_exports_every_figure_of_a_trace_into_a_folder(trace_file, tmp_path, capsys):
    out = tmp_path / "figures"
    assert cli_main(["export", str(trace_file), "--figure", "all", "--format", "html", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    names = sorted(path.name for path in out.iterdir())
    assert sorted(p.rsplit("/", 1)[-1] for p in printed) == names and len(names) == len(export.FIGURES)
    for name in export.FIGURES:  # figure, mode and document in every name
        assert f"famviz-{name}-fam-notes-txt.html" in names
        page = (out / f"famviz-{name}-fam-notes-txt.html").read_text()
        assert _metadata_from_html(page)["figure"] == name
    assert cli_main(["export", str(trace_file), "--figure", "all", "--out", str(out)]) == 2
    assert "--figure all needs --format" in capsys.readouterr().err
    assert cli_main(["export", str(trace_file), "--figure", "all", "--format", "html", "--out", str(trace_file)]) == 2
    assert "names a folder" in capsys.readouterr().err


def test_a_batch_export_skips_what_the_trace_lacks_and_says_so(tmp_path):
    from test_figures import _fam_trace

    trace = _fam_trace()
    for key in ("fam.lens", "fam.lens_p"):
        del trace._chunks[key], trace._layers[key]
    written, skipped = export.export_trace_figures(trace.save(tmp_path / "old.npz"), "html", tmp_path / "out")
    assert list(skipped) == ["lens"] and "did not record the memory lens" in skipped["lens"]
    assert len(written) == len(export.FIGURES) - 1


@needs_browser
@pytest.mark.slow
def test_a_batch_export_in_a_static_format_writes_every_figure(trace_file, tmp_path):
    written, skipped = export.export_trace_figures(trace_file, "svg", tmp_path / "svg")
    assert not skipped and len(written) == len(export.FIGURES)
    assert all(path.read_text().lstrip().startswith("<svg") for path in written)
