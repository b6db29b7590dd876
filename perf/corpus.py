"""The benchmark texts (perf/corpus.txt), shared by the load generator, the perf_analyzer sweep and the soak."""

from __future__ import annotations

from pathlib import Path

from fish_s2.request.dialogue import speakers

CORPUS = Path(__file__).with_name("corpus.txt")


def read_corpus(path: str | Path = CORPUS, voices: int = 1) -> list[str]:
    """The corpus lines that a request with ``voices`` voices may send: a line whose speaker tags name a
    speaker without a voice is left out (the server refuses it)."""
    lines = [t for t in Path(path).read_text().splitlines() if t.strip()]
    return [t for t in lines if max(speakers(t), default=0) < voices]
