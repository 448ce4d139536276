"""scripts/bench_chat.py on a tiny model in fp32: every arm answers every conversation, the cached arms
reuse the earlier turns, and the later turns' replies are identical with and without the cache."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from helpers import save_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench_chat


def test_chats_with_and_without_the_prompt_cache(tmp_path, capsys):
    root = save_tiny_model(tmp_path / "tiny", heads={"arch": "prefix-mlp", "num_heads": 4})
    questions = tmp_path / "questions.jsonl"
    chats = [["Hi there.", "Say more."], ["Count to three.", "Again.", "Once more."]]
    questions.write_text("".join(json.dumps({"question_id": i, "turns": t}) + "\n"
                                 for i, t in enumerate(chats)))
    flags = ["--model", str(root / "heads"), "--question-file", str(questions), "--max-new-tokens", "6",
             "--dtype", "float32", "--no-pace"]
    bench_chat.main(flags)
    out = capsys.readouterr().out
    row = r"\| ([^|]+?) \| ([\d.]+) \| [\d.]+ \| (\d+) \| [\d.]+ \| (\d+) \| (\d+) \|"
    rows = {m[0]: m[1:] for m in re.findall(row, out)}
    assert set(rows) == {"AR + cache", "AR", "Hydra + cache", "Hydra"}, out
    for name, (_, tokens, later_prompt, reused) in rows.items():
        assert int(tokens) == 5 * 6 and int(later_prompt) > 0, out  # 5 turns of 6 tokens each
        assert (int(reused) > 0) == name.endswith("cache"), out
    # 3 later turns (one in the first chat, two in the second), identical in each comparison
    assert out.count("later turns identical 3/3") == 3, out

    bench_chat.main([*flags, "--chain", "2"])
    out = capsys.readouterr().out
    assert "# 1 conversation(s), 2 turns" in out and out.count("later turns identical 1/1") == 3, out
