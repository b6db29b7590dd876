"""Cutting text that arrives in pieces (a language model's output) into segments to speak (torch-free).

A segment ends at a sentence end (``.``, ``!``, ``?``, ``…`` and their CJK forms, with closing quotes or
brackets, followed by a space or a newline: "3.5" and "e.g.x" do not end one). A segment that grows past
``max_chars`` without one is cut at its last clause boundary (``,`` ``;`` ``:`` ``—`` then a space), else
at its last space: never inside a word. :meth:`Segmenter.flush` gives whatever is left (a client's
"flush", the end of input, or an idle timeout). Speaker tags carry over: a segment without its own
``<|speaker:N|>`` tag gets the last one seen, so that a turn cut into sentences keeps its voice.
"""

from __future__ import annotations

import re

from .dialogue import SPEAKER_TAG

SENTENCE_END = re.compile(r"""[.!?…。！？]+["'”’)\]]*(?=\s)|[。！？]+""")
CLAUSE_END = re.compile(r"""[,;:，；：—]+["'”’)\]]*(?=\s)""")


class Segmenter:
    def __init__(self, max_chars: int = 200):
        if max_chars < 16:
            raise ValueError(f"max_chars: must be >= 16, got {max_chars}")
        self.max_chars = max_chars
        self.buffer = ""
        self.speaker: str | None = None   # the last speaker tag seen

    def push(self, delta: str) -> list[str]:
        """Add text; the segments it completed (possibly none)."""
        self.buffer += delta
        out = []
        while (cut := self._cut()) is not None:
            out.append(self._take(cut))
        return [s for s in out if s]

    def flush(self) -> list[str]:
        """Everything left, as segments."""
        out = self.push("")
        if self.buffer.strip():
            out.append(self._take(len(self.buffer)))
        self.buffer = ""
        return [s for s in out if s]

    def _cut(self) -> int | None:
        m = SENTENCE_END.search(self.buffer)
        if m is not None and m.end() <= self.max_chars:
            return m.end()
        if len(self.buffer) <= self.max_chars:
            return None
        head = self.buffer[:self.max_chars]
        clauses = [c.end() for c in CLAUSE_END.finditer(head)]
        if clauses:
            return clauses[-1]
        space = head.rstrip().rfind(" ")
        if space > 0:
            return space
        nxt = re.search(r"\s", self.buffer[self.max_chars:])   # one very long word: wait for its end
        return None if nxt is None else self.max_chars + nxt.start()

    def _take(self, n: int) -> str:
        segment, self.buffer = self.buffer[:n].strip(), self.buffer[n:]
        if not segment:
            return ""
        tags = SPEAKER_TAG.findall(segment)
        starts_tagged = SPEAKER_TAG.match(segment) is not None
        if not starts_tagged and self.speaker is not None:
            segment = f"<|speaker:{self.speaker}|>{segment}"
        if tags:
            self.speaker = tags[-1]
        if not SPEAKER_TAG.sub("", segment).strip():   # a tag alone: the text that follows gets it
            return ""
        return segment
