"""The S2 prompt: a Qwen-style chat whose audio parts are VQ code columns.

A prompt is an int64 tensor [num_codebooks + 1, T]: row 0 holds token ids, rows 1.. hold the codes
of semantic positions (0 at text positions). Layout (upstream ``generate_long``)::

    <|im_start|>system\n  convert the provided text to speech reference to the following:\n\nText:\n
                          <|speaker:0|>ref text 0\n<|speaker:1|>ref text 1   \n\nSpeech:\n   [ref codes]
    <|im_end|>\n
    <|im_start|>user\n{text}<|im_end|>\n
    <|im_start|>assistant\n<|voice|>          <- generation starts here, ends with <|im_end|>

Each text part is tokenized on its own; what a user wrote (the text, reference transcripts) as plain
text, so it cannot contain control tokens (unless the builder is told to allow them, for trusted
callers). The system block depends only on the voice, which is what makes it a cacheable prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from .tokenizer import IM_END, IM_START, VOICE, S2Tokenizer

SPEAKER_TAG = re.compile(r"<\|speaker:\d+\|>")
REFERENCE_INTRO = "convert the provided text to speech reference to the following:\n\nText:\n"
REFERENCE_SPEECH = "\n\nSpeech:\n"
NO_REFERENCE = "convert the provided text to speech"
MAX_TURNS_PER_BATCH = 5


@dataclass(frozen=True)
class Reference:
    """One reference utterance of a voice: its transcript and codec codes [num_codebooks, T]."""

    text: str
    codes: Tensor


class PromptBuilder:
    def __init__(self, tokenizer: S2Tokenizer, num_codebooks: int, allow_control_tokens: bool = False):
        self.tok = tokenizer
        self.num_codebooks = num_codebooks
        self.allow_control_tokens = allow_control_tokens

    def text(self, text: str, user: bool = False) -> Tensor:
        """Token rows of a text part: control text of the prompt, or (``user``) text a user wrote."""
        plain = user and not self.allow_control_tokens
        ids = torch.tensor(self.tok.encode_text(text) if plain else self.tok.encode(text), dtype=torch.long)
        out = torch.zeros(self.num_codebooks + 1, ids.numel(), dtype=torch.long)
        out[0] = ids
        return out

    def codes(self, codes: Tensor) -> Tensor:
        if codes.ndim != 2 or codes.shape[0] != self.num_codebooks:
            raise ValueError(f"codes: expected shape [{self.num_codebooks}, T], got {list(codes.shape)}")
        codes = codes.long()
        return torch.cat([codes[:1] + self.tok.semantic_begin_id, codes], dim=0)

    def system(self, references: list[Reference] = ()) -> Tensor:
        """The system block, ``<|im_end|>\\n`` included: the per-voice prefix."""
        if not references:
            parts = [self.text(NO_REFERENCE)]
        else:
            texts = [r.text if SPEAKER_TAG.search(r.text) else f"<|speaker:{i}|>{r.text}"
                     for i, r in enumerate(references)]
            codes = torch.cat([r.codes for r in references], dim=1)
            parts = [self.text(REFERENCE_INTRO), self.text("\n".join(texts), user=True),
                     self.text(REFERENCE_SPEECH), self.codes(codes)]
        return torch.cat([self.text(f"{IM_START}system\n"), *parts, self.text(f"{IM_END}\n")], dim=1)

    def user(self, text: str) -> Tensor:
        return torch.cat([self.text(f"{IM_START}user\n"), self.text(text, user=True), self.text(f"{IM_END}\n")], dim=1)

    def assistant_start(self) -> Tensor:
        return self.text(f"{IM_START}assistant\n{VOICE}")

    def request(self, text: str, references: list[Reference]) -> tuple[Tensor, int]:
        """The prompt [rows, T] of one request with the whole text as one user turn (upstream's
        behaviour for text without speaker tags), and the length of its cacheable voice prefix."""
        system = self.system(references)
        return torch.cat([system, self.user(text), self.assistant_start()], dim=1), system.shape[1]

    def assistant_turn(self, codes: Tensor) -> Tensor:
        """A finished assistant turn (earlier batch's codes), kept as history for the next batch."""
        return torch.cat([self.assistant_start(), self.codes(codes), self.text(f"{IM_END}\n")], dim=1)


def split_turns(text: str) -> list[str]:
    """Split on ``<|speaker:N|>`` tags; each turn starts with its tag. Text before the first tag is dropped
    (as upstream); no tag at all gives no turns."""
    parts = re.split(f"({SPEAKER_TAG.pattern})", text)
    turns = []
    for i, part in enumerate(parts):
        if SPEAKER_TAG.fullmatch(part.strip()):
            turns.append((part.strip() + (parts[i + 1] if i + 1 < len(parts) else "")).strip())
    return turns


def text_batches(text: str, chunk_length: int, max_turns: int = MAX_TURNS_PER_BATCH) -> list[str]:
    """Group speaker turns into generation batches of at most ``max_turns`` turns and ``chunk_length``
    UTF-8 bytes (a single longer turn stays whole). Text without speaker tags is one batch, verbatim."""
    turns = split_turns(text)
    if not turns:
        return [text]
    batches, current, size = [], [], 0
    for turn in turns:
        n = len(turn.encode("utf-8"))
        if current and (len(current) >= max_turns or size + n > chunk_length):
            batches.append("\n".join(current))
            current, size = [], 0
        current.append(turn)
        size += n
    batches.append("\n".join(current))
    return batches
