"""Bad input is one `[hydra] error:` line and loses nothing: the chat CLI's start-up checks, its !!save/!!load
commands, `~` in path arguments, and the JSON Lines reader every resuming script shares."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import save_tiny_model

from hydra.data.jsonl import iter_jsonl, read_jsonl, read_resumable
from hydra.model.trees import get_tree


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_errors"), heads=dict(num_heads=4))


def chat_main(args: list[str], capsys) -> tuple[int, str]:
    from hydra.inference.cli import main

    rc = main(args)
    return rc, capsys.readouterr().err


def assert_one_error_line(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("[hydra] error: "), err
    for needle in needles:
        assert needle in lines[0], err


# --- the chat CLI's start-up checks -------------------------------------------------------------------------
@pytest.mark.parametrize("content, needle", [
    ({"tree": [[0]]}, "must hold"),                  # an object without "choices"
    ({"choices": [[0], ["a"]]}, "must hold"),         # wrong element types
    ({"choices": [0, 1]}, "must hold"),               # paths that are not lists
    ("{oops", "is not valid JSON"),
])
def test_bad_tree_file_names_the_file(tiny, tmp_path, capsys, content, needle):
    path = tmp_path / "my_tree.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    rc, err = chat_main(["--model", str(tiny / "heads"), "--device", "cpu", "--tree", str(path)], capsys)
    assert rc == 1
    assert_one_error_line(err, str(path), needle)


@pytest.mark.parametrize("flags, needle", [
    (["--temperature", "nan"], "temperature must be >= 0"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--tree", "no_such_tree"], "unknown tree 'no_such_tree'"),
    (["--sampling", "typical", "--temperature", "0.5", "--tree", "tree_32", "--ar"], None),  # fine: no error
])
def test_decoding_settings_are_checked_at_start(tiny, capsys, monkeypatch, flags, needle):
    if needle is None:
        monkeypatch.setattr("hydra.inference.cli.run", lambda chat: None)  # start-up only
        rc, err = chat_main(["--model", str(tiny / "heads"), "--device", "cpu", *flags], capsys)
        assert rc == 0 and "error" not in err
        return
    rc, err = chat_main(["--model", str(tiny / "heads"), "--device", "cpu", *flags], capsys)
    assert rc == 1
    assert_one_error_line(err, needle)


@pytest.mark.parametrize("device, needle", [
    ("cuda", "is not available"),                    # no GPU on the test machine (skipped where there is one)
    ("tpu9", "unknown device 'tpu9'"),
])
def test_bad_device(tiny, capsys, device, needle):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc, err = chat_main(["--model", str(tiny / "heads"), "--device", device], capsys)
    assert rc == 1
    assert_one_error_line(err, needle)


def test_truncated_base_model_weights(tiny, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(tiny / "base", base)
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted copy
    rc, err = chat_main(["--model", str(tiny / "heads"), "--base-model", str(base), "--device", "cpu"],
                        capsys)
    assert rc == 1
    assert_one_error_line(err, str(base), "damaged")


@pytest.mark.parametrize("field, value", [
    ("hydra_num_heads", "4"), ("hydra_num_heads", True), ("dropout_rate", "0.1"), ("share_lm_head", 1),
    ("hydra_head_arch", 3), ("tree", ["not", "a", "name"]), ("feature_layers", [2, "15"]),
    ("feature_layers", 2), ("feature_layers", [True]),
])
def test_wrong_value_types_in_heads_config(tiny, tmp_path, capsys, field, value):
    heads = tmp_path / "heads"
    shutil.copytree(tiny / "heads", heads)
    config = json.loads((heads / "config.json").read_text())
    (heads / "config.json").write_text(json.dumps(dict(config, **{field: value})))
    rc, err = chat_main(["--model", str(heads), "--device", "cpu"], capsys)
    assert rc == 1
    assert_one_error_line(err, str(heads / "config.json"), repr(field))


# --- !!save / !!load keep the conversation ------------------------------------------------------------------
class _Out:
    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass


@pytest.fixture(scope="module")
def chat(tiny):
    from hydra.inference.cli import Chat
    from hydra.model import HydraModel
    from hydra.model.generate import DecodeConfig

    model = HydraModel.from_pretrained(tiny / "heads", dtype="float32").eval()
    return Chat(model, True, DecodeConfig(max_new_tokens=4), None, _Out(), stats=False)


def _conversation():
    return [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]


@pytest.mark.parametrize("target", ["missing/sub/conv.json", "."])
def test_save_failure_keeps_the_conversation(chat, tmp_path, target):
    chat.messages, chat.out = _conversation(), _Out()
    assert chat.command(f"!!save {tmp_path / target}") is True
    assert chat.messages == _conversation()
    assert "could not save" in chat.out.text and "the conversation is kept" in chat.out.text
    assert chat.out.text.count("\n") == 1


@pytest.mark.parametrize("payload", [
    {"messages": [{"role": "user", "content": ["not", "a", "string"]}]},
    {"messages": [{"role": "user", "content": {"text": "hi"}}]},
    {"messages": [{"role": "robot", "content": "hi"}]},
    {"messages": "user: hi"},
    [{"role": "user"}],
])
def test_load_rejects_malformed_messages_and_keeps_the_conversation(chat, tmp_path, payload):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(payload))
    chat.messages, chat.out = _conversation(), _Out()
    assert chat.command(f"!!load {path}") is True
    assert chat.messages == _conversation()
    assert "could not load" in chat.out.text and chat.out.text.count("\n") == 1
    chat.messages.append({"role": "user", "content": "And now?"})
    assert chat.reply()  # the next turn works


# --- `~` in path arguments ----------------------------------------------------------------------------------
def test_tilde_is_expanded(tiny, tmp_path, monkeypatch, capsys, chat):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    shutil.copytree(tiny / "heads", home / "heads")
    (home / "t.json").write_text(json.dumps({"choices": [[0], [0, 0]]}))
    assert get_tree("~/t.json") == [[0], [0, 0]]
    monkeypatch.setattr("hydra.inference.cli.run", lambda chat: None)  # start-up only
    rc, err = chat_main(["--model", "~/heads", "--base-model", str(tiny / "base"), "--tree", "~/t.json",
                         "--device", "cpu"], capsys)
    assert rc == 0, err
    chat.messages, chat.out = _conversation(), _Out()
    chat.command("!!save ~/conv.json")
    assert json.loads((home / "conv.json").read_text())["messages"] == _conversation()
    chat.messages = []
    chat.command("!!load ~/conv.json")
    assert chat.messages == _conversation()


def test_every_path_option_expands_tilde():
    """Each script's path options go through os.path.expanduser (argparse applies `type` to every value)."""
    import ast

    repo = Path(__file__).resolve().parents[1]
    path_flags = {"--model", "--model-path", "--base-model", "--tree", "--trees", "--heads", "--answer-file",
                  "--question-file", "--answer-dir", "--ref-answer-file", "--judge-file", "--output-file",
                  "--input-file", "--baseline", "--hydra", "--plot", "--data", "--vocab-data", "--counts",
                  "--input", "--output-dir", "--prompts", "--output", "--folder", "--out"}
    files = [*repo.glob("hydra/**/*.py"), *repo.glob("llm_judge/*.py"), *repo.glob("scripts/*.py")]
    checked = 0
    for file in files:
        if file.parts[-2] == "train":
            continue  # hydra/train/train.py keeps the original recipe's flags (its own tests cover them)
        for node in ast.walk(ast.parse(file.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument"
                    and node.args and isinstance(node.args[0], ast.Constant)
                    and node.args[0].value in path_flags):
                types = [ast.unparse(k.value) for k in node.keywords if k.arg == "type"]
                assert types == ["os.path.expanduser"], f"{file.name}: {node.args[0].value} does not expand ~"
                checked += 1
    assert checked >= 30


# --- JSON Lines ---------------------------------------------------------------------------------------------
def test_read_resumable_drops_only_a_torn_last_line(tmp_path, capsys):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": 1}\n\n[1, 2]\n{"id": 2}\n{"id": 3, "conv')
    assert read_resumable(path) == [{"id": 1}, {"id": 2}]
    assert path.read_bytes() == b'{"id": 1}\n\n[1, 2]\n{"id": 2}\n'  # cut at the torn line, nothing else
    err = capsys.readouterr().err
    assert f"{path}:3: ignoring an unreadable line" in err and "dropping a truncated last line" in err
    assert read_resumable(tmp_path / "none.jsonl") == []


def test_strict_reader_names_file_and_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"a": 1}\n\n{oops\n')
    with pytest.raises(ValueError, match=rf"{path}:3: not a JSON line"):
        read_jsonl(path)
    path.write_text('{"a": 1}\n[2]\n')
    with pytest.raises(ValueError, match=rf"{path}:2: expected a JSON object"):
        read_jsonl(path)
    assert [n for n, _ in iter_jsonl(path)] == [1, 2]
