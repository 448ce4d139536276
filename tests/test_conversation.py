"""hydra.inference.conversation.converse on a tiny model in fp32: the history carries the model's own
replies, the prompt cache changes nothing but the prefill, and a turn past the context is an error turn, not a
crash."""

from __future__ import annotations

import pytest
from helpers import save_tiny_model

from hydra.inference.conversation import converse
from hydra.inference.loading import load_model, render_prompt
from hydra.model.generate import DecodeConfig, ar_generate, hydra_generate


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = save_tiny_model(tmp_path_factory.mktemp("conv"), context=160, heads=dict(num_heads=4))
    return load_model(root / "heads", dtype="float32", device="cpu")[0]


def test_turns_follow_the_history_and_the_cache_only_saves_prefill(model):
    config = DecodeConfig(max_new_tokens=5)
    cached = converse(model, ["Hi.", "And then?", "Why?"], hydra_generate, config)
    plain = converse(model, ["Hi.", "And then?", "Why?"], ar_generate, config, cached=False)
    assert [t.tokens for t in cached] == [t.tokens for t in plain]  # greedy speculative == greedy
    assert [t.reused_prompt_tokens for t in plain] == [0, 0, 0]
    assert cached[0].reused_prompt_tokens == 0 and all(t.reused_prompt_tokens > 0 for t in cached[1:])
    history = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": cached[0].reply},
               {"role": "user", "content": "And then?"}]
    assert cached[1].prompt_tokens == len(render_prompt(model.tokenizer, history))
    for t in cached:
        assert t.reply == model.tokenizer.decode(t.tokens, skip_special_tokens=True).strip()
        assert 0 < t.first_token_time <= t.wall_time and sum(t.accept_lengths) >= len(t.tokens) > 0


def test_a_turn_past_the_context_is_an_error_and_later_turns_are_still_asked(model, capsys):
    turns = ["Hi.", "word " * 200, "Short?"]
    done = converse(model, turns, hydra_generate, DecodeConfig(max_new_tokens=4), error_reply="$ERROR$",
                    label="q7 ")
    assert done[0].finish_reason != "error" and done[0].tokens
    assert done[1].finish_reason == "error" and done[1].reply == "$ERROR$" and done[1].tokens == []
    assert done[1].prompt_tokens > 160 and done[1].wall_time == 0.0
    assert done[2].finish_reason == "error"  # the long turn stays in the history
    assert "q7 turn 2:" in capsys.readouterr().err
