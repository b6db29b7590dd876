"""S2 text tokenizer: Hugging Face ``tokenizers`` over the checkpoint's ``tokenizer.json``.

:meth:`S2Tokenizer.encode` parses special tokens (``<|im_start|>``, ``<|voice|>``...) inline: it is
for the prompt's own control text. :meth:`S2Tokenizer.encode_text` encodes what a user wrote (the
text to speak, a reference transcript) with special-token strings as plain text, so user text can
never close a turn or inject audio codes. ``<|speaker:N|>`` and emotion tags such as ``[whisper]``
are ordinary text either way, exactly as upstream.
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
        self._plain = Tokenizer.from_str(tokenizer.to_str())
        self._plain.encode_special_tokens = True
        self._control_ids = frozenset(tokenizer.get_added_tokens_decoder())

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
        """Control text: special tokens in it are parsed."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_text(self, text: str) -> list[int]:
        """User text: special-token strings are plain text (never a control token)."""
        ids = self._plain.encode(text, add_special_tokens=False).ids
        if self._control_ids.intersection(ids):   # an added token that is not marked special
            raise ValueError("text: the tokenizer turned user text into control tokens "
                             f"{sorted(self._control_ids.intersection(ids))}")
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)
