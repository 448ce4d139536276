"""The chat CLI, through a real pseudo-terminal (pexpect) and in-process.

A tiny random Llama (SmolLM2's real tokenizer and chat template, 2 layers, d=32, 256-token context) plus
random heads are saved to a temporary folder once per module; the CLI loads them like any heads folder.
"""

from __future__ import annotations

import io
import os
import re
import signal
import sys
from pathlib import Path

import pytest
from helpers import save_tiny_model

pexpect = pytest.importorskip("pexpect")

REPO = Path(__file__).resolve().parents[1]
STATS = re.compile(r"\[stats\] (\d+) tokens in ([\d.]+) s, ([\d.]+) tokens/s, "
                   r"tau ([\d.]+) tokens/step \((\d+) steps\)")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_chat"), heads=dict(num_heads=4))


def spawn(*args: str, timeout: int = 180):
    env = dict(os.environ, TERM="dumb", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    # A test run started in the background (`cmd &`) inherits an ignored SIGINT, and Python keeps it ignored,
    # so Ctrl-C would never reach the chat: give the child the default disposition back.
    child = pexpect.spawn(sys.executable, ["-m", "hydra.inference.cli", *args], cwd=str(REPO), env=env,
                          encoding="utf-8", timeout=timeout, dimensions=(50, 400),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.logfile_read = io.StringIO()  # the whole transcript, for failure messages
    return child


def transcript(child) -> str:
    return child.logfile_read.getvalue()


def test_chat_session_through_a_pty(tiny_folder):
    child = spawn("--model", str(tiny_folder / "heads"), "--max-new-tokens", "8", "--stats", "--device",
                  "cpu", "--system", "You are terse.")
    try:
        child.expect(r"4 hydra-mlp heads, tree mc_sim_7b_63, prompt lookup 8 tokens")
        child.expect_exact("USER: ")
        child.sendline("Hello, who are you?")
        child.expect_exact("ASSISTANT: ")
        child.expect(STATS)
        n, tps, tau, steps = (int(child.match[1]), float(child.match[3]), float(child.match[4]),
                              int(child.match[5]))
        reply = child.before
        assert n == 8 and 1 <= steps <= 8 and tps > 0 and tau >= 1.0
        assert "[reply stopped at --max-new-tokens 8]" in reply
        assert reply.split("[reply stopped")[0].strip(), "no streamed text before the stats line"

        child.expect_exact("USER: ")
        child.sendline("!!regen")
        child.expect_exact("[regenerating the reply to: 'Hello, who are you?']")
        child.expect(STATS)

        # A message longer than the 256-token context: a clear message, and the loop goes on.
        child.expect_exact("USER: ")
        child.sendline("word " * 400)
        child.expect(r"the conversation is \d+ tokens but the model's context holds 256; type !!reset")

        child.expect_exact("USER: ")
        child.sendline("!!reset")
        child.expect_exact("[new conversation]")
        child.expect_exact("USER: ")
        child.sendline("!!exit")
        child.expect_exact("exit...")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, transcript(child)


def test_ctrl_c_stops_a_reply_and_ctrl_d_exits(tiny_folder):
    child = spawn("--model", str(tiny_folder / "heads"), "--max-new-tokens", "200", "--device", "cpu",
                  "--dtype", "float32", "--ar")
    try:
        child.expect(r"plain autoregressive decoding")
        child.expect_exact("USER: ")
        child.sendline("Tell me a long story.")
        child.expect_exact("ASSISTANT: ")
        child.expect(r"\S")  # the first streamed characters
        child.sendintr()
        child.expect_exact("[reply interrupted; the unfinished exchange was dropped]")
        child.expect_exact("USER: ")
        child.sendeof()
        child.expect_exact("exit...")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, transcript(child)


def test_ctrl_c_at_the_prompt_exits(tiny_folder):
    child = spawn("--model", str(tiny_folder / "heads"), "--device", "cpu")
    try:
        child.expect_exact("USER: ")
        child.sendintr()
        child.expect_exact("exit...")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, transcript(child)


def test_help():
    child = spawn("-h", timeout=60)
    child.expect(pexpect.EOF)
    child.close()
    out = transcript(child)
    assert child.exitstatus == 0, out
    for flag in ("--model", "--base-model", "--temperature", "--posterior-threshold", "--posterior-alpha",
                 "--sampling", "--tree", "--max-new-tokens", "--dtype", "--device", "--stats", "--system"):
        assert flag in out


def test_bad_heads_folder_is_a_clear_error(tmp_path):
    from hydra.inference.cli import main

    assert main(["--model", str(tmp_path / "nope"), "--device", "cpu"]) == 1


# --- in-process: streaming granularity, commands, the no-heads fallback -------------------------------------
class Recorder(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, s):
        self.writes.append(s)
        return super().write(s)


@pytest.fixture(scope="module")
def tiny_model(tiny_folder):
    from hydra.model import HydraModel

    return HydraModel.from_pretrained(tiny_folder / "heads", dtype="float32").eval()


def test_reply_streams_step_by_step_and_commands(tiny_model, tmp_path):
    from hydra.inference.cli import Chat
    from hydra.model.generate import DecodeConfig

    out = Recorder()
    chat = Chat(tiny_model, True, DecodeConfig(max_new_tokens=10), "Be brief.", out, stats=True)
    chat.messages.append({"role": "user", "content": "Hi"})
    assert chat.reply()
    text_writes = [w for w in out.writes[1:] if w and not w.startswith(("\n", "["))]
    assert len(text_writes) >= 3, out.writes  # one write per accepted step, not one per reply
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant"]
    assert chat.messages[-1]["content"]

    chat.command(f"!!save {tmp_path / 'conv.json'}")
    chat.command("!!remove")
    assert [m["role"] for m in chat.messages] == ["system"]
    chat.command(f"!!load {tmp_path / 'conv.json'}")
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant"]
    chat.command("!!reset")
    assert chat.messages == [{"role": "system", "content": "Be brief."}]
    assert chat.command("!!exit") is False

    ar = Chat(tiny_model, False, DecodeConfig(max_new_tokens=5), None, Recorder(), stats=True)
    ar.messages.append({"role": "user", "content": "Hi"})
    assert ar.reply()
    assert ("[stats] 5 tokens in" in ar.out.getvalue()
            and "tau 1.00 tokens/step (5 steps)" in ar.out.getvalue())


def test_a_chat_prefills_only_what_the_previous_call_did_not_compute(tiny_model):
    """With the CLI's prompt cache every reply (a second turn, a regenerated one, one after !!remove) is the
    one a chat without it gives (fp32), and the stats say how many prompt tokens were reused."""
    from hydra.inference.cli import Chat
    from hydra.model.generate import DecodeConfig
    from hydra.model.prompt_cache import PromptCache

    chats = [Chat(tiny_model, True, DecodeConfig(max_new_tokens=12, prompt_cache=cache), "Be brief.",
                  Recorder(), stats=True) for cache in (PromptCache(), None)]
    for chat in chats:
        for line in ("Hi", "And then?", "!!regen", "!!remove", "Something else"):
            if line.startswith("!!"):
                chat.command(line)
            else:
                chat.messages.append({"role": "user", "content": line})
                assert chat.reply()
    assert chats[0].messages == chats[1].messages
    stats = chats[0].out.getvalue()
    reused = [tuple(map(int, m)) for m in re.findall(r"(\d+) of (\d+) prompt tokens reused", stats)]
    (r1, m1), (r2, _), (r3, m3), (r4, _) = reused
    # turn 2 shares at least turn 1's prompt (the reply's text may tokenise differently); the regenerated
    # reply's prompt is the one before it, all of it reused but its last token
    assert r1 == 0 and r2 >= m1 and r3 == m3 - 1 and 0 < r4 <= r3, reused
    assert "reused" not in chats[1].out.getvalue()


def test_no_shipped_heads_falls_back_to_plain_decoding(tiny_folder, tmp_path, monkeypatch):
    from hydra.inference import loading

    monkeypatch.setattr(loading, "DEFAULT_HEADS_DIR", tmp_path / "missing")
    model, has_heads = loading.load_model(None, str(tiny_folder / "base"), "float32", "cpu")
    assert not has_heads and model.tokenizer is not None
    with pytest.raises(FileNotFoundError, match="no heads given"):
        loading.load_model(None, str(tiny_folder / "base"), "float32", "cpu", heads_required=True)
