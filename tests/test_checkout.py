"""The repository stands alone: a clone in a folder with no siblings collects the whole test suite, and no
tracked file refers to a folder next to the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=str(cwd), check=True, capture_output=True, text=True,
                          timeout=300).stdout


@pytest.fixture(scope="module")
def tracked() -> list[str]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    return _git("ls-files").splitlines()


def test_a_clone_with_no_siblings_collects_the_suite(tracked, tmp_path):
    """`git clone` of this commit into an empty folder, then `pytest --collect-only` there: every test module
    imports and finds its data inside the clone (the committed tree; uncommitted edits are not part of it)."""
    clone = tmp_path / "alone" / "hydra"
    _git("clone", "--quiet", "--no-checkout", str(REPO), str(clone))
    _git("checkout", "--quiet", _git("rev-parse", "HEAD").strip(), cwd=clone)
    assert sorted(p.name for p in clone.parent.iterdir()) == ["hydra"]
    env = dict(os.environ, PYTHONPATH=str(clone))  # import the clone's hydra, not an installed one
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                       cwd=str(clone), env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "error" not in out.lower().split("tests collected")[-1], out[-4000:]
    collected = int(out.split(" tests collected")[0].split()[-1])
    assert collected > 100, out[-2000:]


def test_no_tracked_file_refers_to_a_sibling_folder(tracked):
    needle = "../" + "shared"  # spelled in two parts so this file does not match itself
    offenders = []
    for name in tracked:
        path = REPO / name
        if path.suffix in {".py", ".sh", ".md", ".toml", ".json", ".cfg", ".txt", ".yml", ".yaml", ""} \
                and path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            offenders += [f"{name}:{i}" for i, line in enumerate(text.splitlines(), 1) if needle in line]
    assert not offenders, f"references to {needle}: {offenders}"
