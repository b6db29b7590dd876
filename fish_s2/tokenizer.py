"""S2 text tokenizer: Hugging Face ``tokenizers`` over the checkpoint's ``tokenizer.json``.

Special tokens in text (``<|im_start|>``, ``<|voice|>``...) are parsed inline; ``<|speaker:N|>``
and emotion tags such as ``[whisper]`` are ordinary text, exactly as upstream.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VOICE = "<|voice|>"
SEMANTIC = "<|semantic:{}|>"


class S2Tokenizer:
    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        semantic_ids = []
        while SEMANTIC.format(len(semantic_ids)) in vocab:
            semantic_ids.append(vocab[SEMANTIC.format(len(semantic_ids))])
        if not semantic_ids:
            raise ValueError("tokenizer.json has no <|semantic:N|> tokens: not an S2 tokenizer")
        self.semantic_begin_id = min(semantic_ids)
        self.semantic_end_id = max(semantic_ids)
        if self.semantic_end_id - self.semantic_begin_id + 1 != len(semantic_ids):
            raise ValueError("tokenizer.json: semantic token ids are not contiguous")
        self.im_end_id = self.token_id(IM_END)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path) -> "S2Tokenizer":
        path = Path(checkpoint_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json in the checkpoint directory")
        return cls(Tokenizer.from_file(str(path)))

    def token_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise ValueError(f"tokenizer.json has no token {token!r}")
        return tid

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)
