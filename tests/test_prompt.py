"""Prompt layout and speaker-turn batching (upstream generate_long semantics)."""

import pytest
import torch

from fish_s2.prompt import PromptBuilder, Reference
from fish_s2.request.dialogue import split_turns, text_batches


def test_split_turns_keeps_tags_and_drops_untagged_prefix():
    assert split_turns("intro <|speaker:0|> Hi there. <|speaker:1|>Yo!") == ["<|speaker:0|> Hi there.",
                                                                            "<|speaker:1|>Yo!"]
    assert split_turns("no tags [laugh] here") == []


def test_text_batches_respects_bytes_and_turn_count():
    assert text_batches("plain [whisper] text", 10) == ["plain [whisper] text"]
    text = "".join(f"<|speaker:{i % 2}|>turn {i}." for i in range(7))
    batches = text_batches(text, 10_000)
    assert [b.count("<|speaker:") for b in batches] == [5, 2]
    small = text_batches("<|speaker:0|>aaaa <|speaker:1|>bbbb <|speaker:0|>cc", 40)
    assert small == ["<|speaker:0|>aaaa\n<|speaker:1|>bbbb", "<|speaker:0|>cc"]
    assert text_batches("<|speaker:0|>" + "x" * 50, 10) == ["<|speaker:0|>" + "x" * 50]


def test_system_block_tags_references_and_places_codes(tiny):
    b = PromptBuilder(tiny.tokenizer, tiny.config.num_codebooks)
    codes = [torch.randint(0, 1024, (10, n)) for n in (3, 4)]
    system = b.system([Reference("first", codes[0]), Reference("<|speaker:7|>second", codes[1])])
    text = tiny.tokenizer.decode(system[0][system[0] < tiny.config.semantic_begin_id].tolist())
    assert "<|speaker:0|>first\n<|speaker:7|>second" in text
    sem = (system[0] >= tiny.config.semantic_begin_id) & (system[0] <= tiny.config.semantic_end_id)
    assert int(sem.sum()) == 7
    assert torch.equal(system[1:, sem], torch.cat(codes, dim=1))
    assert torch.equal(system[0, sem], torch.cat(codes, dim=1)[0] + tiny.config.semantic_begin_id)
    assert (system[1:, ~sem] == 0).all()
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|>\n")


def test_codes_shape_is_checked(tiny):
    b = PromptBuilder(tiny.tokenizer, tiny.config.num_codebooks)
    with pytest.raises(ValueError, match="codes"):
        b.codes(torch.zeros(9, 4, dtype=torch.long))
