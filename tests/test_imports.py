"""The repo's top-level kernels/ folder never shadows the PyPI package `kernels`.

transformers imports that package. `python -m`, torchrun, deepspeed and pytest put the working
folder first on sys.path, so each check runs in a fresh process started from the repo root, with
the PyPI package installed, as a user's command would.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import metrics

ROOT = Path(__file__).resolve().parents[1]


def run_from_root(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_the_pypi_package_is_installed_and_wins():
    """Without the PyPI package these checks would prove nothing; with it, `import kernels` from the
    repo root must be that package, and the repo's folder must not be a regular package at all."""
    assert importlib.metadata.version("kernels")
    assert not (ROOT / "kernels" / "__init__.py").exists()
    out = run_from_root(sys.executable, "-c", "import kernels, transformers.activations; print(kernels.__file__)")
    assert out.returncode == 0, out.stderr
    installed = importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")
    assert Path(out.stdout.strip()).resolve() == Path(installed).resolve(), out.stdout


def test_the_folder_is_the_projects_kernels_package():
    out = run_from_root(sys.executable, "-c", "from llara_dist.kernels import registry; print(registry.__file__)")
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve() == ROOT / "kernels" / "registry.py"


def test_cli_starts_from_the_repo_root():
    out = run_from_root(sys.executable, "-m", "llara_dist", "--help")
    assert out.returncode == 0, out.stderr
    assert "train" in out.stdout


def test_pytest_collects_from_the_repo_root():
    out = run_from_root(sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests",
                        timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "error" not in out.stdout.splitlines()[-1], out.stdout[-3000:]


@pytest.mark.slow
def test_torchrun_two_ranks_train_from_the_repo_root(train_setup, tmp_path):
    """`torchrun -m llara_dist train`, 2 CPU ranks, started in the repo root: the trainer imports
    transformers, DeepSpeed and the project's kernels and takes its steps."""
    root, _ = train_setup
    run_dir = tmp_path / "run"
    out = run_from_root(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "llara_dist", "train", "--config", str(root / "run.yaml"), f"run_dir={run_dir}",
                        "train.steps=2", timeout=300, env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert [m["step"] for m in metrics(run_dir)] == [1, 2], json.dumps(metrics(run_dir))
