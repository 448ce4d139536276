"""scripts/llamacpp_step_cost.py: bad input stops with one clear line before any work; where llama-cpp-python
is installed, a tree batch on the default model's GGUF reproduces llama.cpp's plain greedy tokens."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import llamacpp_step_cost


def _run(monkeypatch, *argv: str) -> None:
    monkeypatch.setattr(sys, "argv", ["llamacpp_step_cost.py", *argv])
    llamacpp_step_cost.main()


def test_missing_gguf_is_one_clear_error(monkeypatch, tmp_path):
    with pytest.raises(SystemExit, match=r"--gguf .*missing\.gguf: no such file"):
        _run(monkeypatch, "--gguf", str(tmp_path / "missing.gguf"))


def test_bad_context_is_refused_before_loading(monkeypatch, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # would fail on import if loading were reached
    with pytest.raises(SystemExit, match=r"--context 5000: choose 1\.\.2040"):
        _run(monkeypatch, "--gguf", str(gguf), "--context", "5000")


def test_without_llama_cpp_says_what_to_install(monkeypatch, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    with pytest.raises(SystemExit, match=r"needs llama-cpp-python: pip install '\.\[llamacpp\]'"):
        _run(monkeypatch, "--gguf", str(gguf))


@pytest.mark.slow
def test_tree_batch_reproduces_plain_greedy_on_the_default_gguf(monkeypatch, capsys):
    pytest.importorskip("llama_cpp")
    from hydra.model.base_model import _gguf_path

    _run(monkeypatch, "--gguf", str(_gguf_path()), "--reps", "2", "--context", "64")
    out = capsys.readouterr().out
    assert "(equal); hidden states max |diff| 0;" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and line.endswith("x |")]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "2", "3", "4", "8"]
