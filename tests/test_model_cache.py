"""Filling the hydra cache (the converted default model, its GGUF blocks) is safe when several processes do it
at once and when one is killed half-way: each writes under a name of its own and renames a whole result onto
the final name. The conversion itself is replaced by a fake here (the real one: test_default_model.py)."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from hydra.model import base_model


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """Empty cache; a fake GGUF whose 'conversion' writes two files slowly and counts its calls."""
    monkeypatch.setenv("HYDRA_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(base_model, "_gguf_path", lambda: gguf)
    calls = []

    def convert(src, out):
        calls.append(out)
        out.mkdir()
        (out / "model.safetensors").write_text(f"weights from {out.name}")
        time.sleep(0.2)  # the two racers overlap here
        (out / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(base_model, "_convert_gguf", convert)
    return calls


def _race(fn, n: int = 3) -> list:
    start, out = threading.Barrier(n), [None] * n

    def run(k):
        start.wait()
        try:
            out[k] = fn()
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            out[k] = e

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_concurrent_conversions_publish_one_whole_folder(fake_gguf):
    folders = _race(base_model.default_model_path)
    final = base_model.cache_dir() / "SmolLM2-135M-Instruct"
    assert folders == [final] * 3, folders
    assert len(fake_gguf) == 3  # all three converted; one folder won, the others were dropped
    assert sorted(p.name for p in final.iterdir()) == ["model.safetensors", "tokenizer.json"]
    assert (final / "model.safetensors").read_text().startswith("weights from SmolLM2-135M-Instruct.partial-")
    assert [p.name for p in final.parent.iterdir()] == [final.name]  # no temporary folder left behind
    assert base_model.default_model_path() == final and len(fake_gguf) == 3  # converted once and for all


def test_a_killed_conversion_leaves_nothing_that_counts(fake_gguf):
    parent = base_model.cache_dir()
    parent.mkdir(parents=True)
    dead = parent / "SmolLM2-135M-Instruct.partial-999999999-deadbeef"  # no such process
    alive = parent / f"SmolLM2-135M-Instruct.partial-{os.getpid()}-0000beef"  # a conversion still running
    legacy = parent / "SmolLM2-135M-Instruct.partial"  # the name earlier versions used
    for leftover in (dead, alive, legacy):
        leftover.mkdir()
        (leftover / "model.safetensors").write_text("half")
    final = base_model.default_model_path()
    assert (final / "tokenizer.json").is_file() and len(fake_gguf) == 1
    assert not dead.exists() and not legacy.exists() and alive.exists()


def test_an_incomplete_final_folder_is_converted_again(fake_gguf):
    final = base_model.cache_dir() / "SmolLM2-135M-Instruct"
    final.mkdir(parents=True)
    (final / "model.safetensors").write_text("old")  # tokenizer.json removed by hand
    assert base_model.default_model_path() == final and len(fake_gguf) == 1
    assert (final / "tokenizer.json").is_file() and (final / "model.safetensors").read_text() != "old"


def test_concurrent_gguf_block_caches_write_whole_files(fake_gguf, monkeypatch):
    from hydra.model import quant

    blocks = {"blk.0.w": ("Q4_1", torch.arange(4096, dtype=torch.uint8))}
    import safetensors.torch

    write = safetensors.torch.save_file

    def slow_write(*args, **kwargs):  # the racers' writes and renames overlap
        write(*args, **kwargs)
        time.sleep(0.2)

    monkeypatch.setattr(quant, "read_gguf_blocks", lambda path: blocks)
    monkeypatch.setattr(safetensors.torch, "save_file", slow_write)
    base_model.default_model_path()
    results = _race(base_model.default_gguf_blocks)
    assert all(isinstance(r, dict) and torch.equal(r["blk.0.w"][1], blocks["blk.0.w"][1]) for r in results)
    folder = base_model.cache_dir() / "SmolLM2-135M-Instruct"
    assert sorted(p.name for p in folder.iterdir()) == ["gguf_blocks.safetensors", "model.safetensors",
                                                        "tokenizer.json"]
    again = base_model.default_gguf_blocks()  # read back from the cached file
    assert again["blk.0.w"][0] == "Q4_1" and torch.equal(again["blk.0.w"][1], blocks["blk.0.w"][1])
