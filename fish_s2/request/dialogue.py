"""Speaker turns of a request's text (torch-free): upstream ``generate_long``'s split into turns and
batches, and the checks a dialogue request gets where it enters.

Text is split on ``<|speaker:N|>`` tags (plain text to the tokenizer, not control tokens); each turn
starts with its tag. Turns are grouped into batches of at most MAX_TURNS_PER_BATCH turns and
``chunk_length`` UTF-8 bytes (a single longer turn stays whole); text without any tag is one batch,
verbatim. Voice i of a request is speaker i.
"""

from __future__ import annotations

import re

from .errors import InvalidArgument
from .params import integer

SPEAKER_TAG = re.compile(r"<\|speaker:(\d+)\|>")
MAX_TURNS_PER_BATCH = 5
CHUNK_LENGTH_MIN, CHUNK_LENGTH_MAX = 100, 1000   # upstream's server: chunk_length 200 (100..1000)
SERVER_CHUNK_LENGTH = 200


def speakers(text: str) -> list[int]:
    """The speaker index of each ``<|speaker:N|>`` tag in the text, in order."""
    return [int(m.group(1)) for m in SPEAKER_TAG.finditer(text)]


def split_turns(text: str) -> list[str]:
    """Split on ``<|speaker:N|>`` tags; each turn starts with its tag. Text before the first tag is dropped
    (as upstream); no tag at all gives no turns."""
    parts = re.split(f"({SPEAKER_TAG.pattern})", text)
    turns = []
    i = 1
    while i < len(parts):            # re.split with one group: text, tag, number, text, tag, number, ...
        turns.append((parts[i] + parts[i + 2]).strip())
        i += 3
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


def check_dialogue(text: str, n_voices: int, max_voices: int, max_turns: int, chunk_length: int) -> list[str]:
    """A request's text against its voices and the deployment's bounds; its batches. Errors name the field:
    too many voices, a tag naming a speaker with no voice (when the request has voices; without any, the
    model picks each speaker's voice as upstream does), text before the first tag (upstream would drop it
    silently), an empty turn, too many turns."""
    integer("chunk_length", chunk_length, CHUNK_LENGTH_MIN, CHUNK_LENGTH_MAX)
    if n_voices > max_voices:
        raise InvalidArgument("voice_id", f"{n_voices} voices, the limit is {max_voices}")
    used = speakers(text)
    if n_voices and used and max(used) >= n_voices:
        raise InvalidArgument("text", f"<|speaker:{max(used)}|> names speaker {max(used)}, but the request has "
                                      f"{n_voices} voice{'s' if n_voices > 1 else ''} (speakers 0..{n_voices - 1})")
    if used:
        head = SPEAKER_TAG.split(text, maxsplit=1)[0]
        if head.strip():
            raise InvalidArgument("text", f"{head.strip()[:40]!r} comes before the first speaker tag and would not be "
                                          "spoken: start the text with <|speaker:N|> (or use no tags)")
        for i, turn in enumerate(split_turns(text)):
            if not SPEAKER_TAG.sub("", turn).strip():
                raise InvalidArgument("text", f"turn {i} ({turn[:16]}) is empty")
        if len(used) > max_turns:
            raise InvalidArgument("text", f"{len(used)} speaker turns, the limit is {max_turns}")
    return text_batches(text, chunk_length)
