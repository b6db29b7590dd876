"""Text in while it is being written, speech out as one stream: a Triton session fed segment by segment.

:class:`TextSession` cuts the text it is given (:class:`~fish_s2.request.segmenter.Segmenter`: sentences,
clauses past a length bound, what :meth:`TextSession.flush` asks for), opens the server-side session with
the first segment and appends each later one as the next turn of the same engine request
(:meth:`fish_s2.client.AsyncTTSClient.open_session`): one stream, one chunk numbering, only new tokens
prefilled. Used by ``say --stream-text`` and the bridge's WebSocket endpoint::

    async with AsyncTTSClient(url) as client:
        session = TextSession(client, voice_id="alice")
        async def feed():
            async for delta in llm_stream():
                await session.send_text(delta)
            await session.end()
        asyncio.create_task(feed())
        async for chunk in session.chunks():
            play(chunk.audio)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from .client import AsyncTTSClient, AudioChunk
from .request import NotFound
from .request.segmenter import Segmenter


class TextSession:
    def __init__(self, client: AsyncTTSClient, max_segment_chars: int = 200, **fields):
        """``fields``: the tts request fields (voice_id, seed, sample_format, ...), as for a single request."""
        self.client, self.fields = client, fields
        self.segmenter = Segmenter(max_segment_chars)
        self._segments: asyncio.Queue = asyncio.Queue()   # str, then None at the end of input
        self.input_ended = False
        self.ended_by_server = False    # the server ended the stream before the input ended (its frame limit)
        self.segments: list[str] = []         # every segment cut so far ...
        self.segment_times: list[float] = []  # ... and when (time.perf_counter()): its last text arrived

    async def send_text(self, delta: str) -> None:
        await self._put(self.segmenter.push(delta))

    async def flush(self) -> None:
        """Speak what has arrived so far, even mid-sentence."""
        await self._put(self.segmenter.flush())

    async def end(self) -> None:
        """No more text: the stream ends once everything sent is spoken."""
        if not self.input_ended:
            await self.flush()
            self.input_ended = True
            await self._segments.put(None)

    @property
    def has_pending_text(self) -> bool:
        return bool(self.segmenter.buffer.strip())

    async def _put(self, segments: list[str]) -> None:
        for segment in segments:
            self.segments.append(segment)
            self.segment_times.append(time.perf_counter())
            await self._segments.put(segment)

    async def chunks(self) -> AsyncIterator[AudioChunk]:
        """The session's audio chunks in order (nothing if it ends before any text)."""
        first = await self._segments.get()
        if first is None:
            return
        session = self.client.open_session(first, **self.fields)
        appender = asyncio.create_task(self._append(session))
        chunks = session.chunks()
        following = None
        try:
            while True:   # the next chunk, unless appending fails first (its error then ends the stream)
                following = following or asyncio.ensure_future(anext(chunks))
                await asyncio.wait({following} | ({appender} if not appender.done() else set()),
                                   return_when=asyncio.FIRST_COMPLETED)
                if _refused(appender):
                    raise appender.exception()
                if not following.done():
                    continue
                try:
                    chunk = following.result()
                except StopAsyncIteration:
                    break
                following = None
                yield chunk
        finally:
            if following is not None and not following.done():
                following.cancel()
                with contextlib.suppress(BaseException):
                    await following
            await chunks.aclose()
            if not appender.done():
                appender.cancel()
                with contextlib.suppress(BaseException):
                    await appender
        if _refused(appender):
            raise appender.exception()
        self.ended_by_server = not (self.input_ended and appender.done() and not appender.cancelled()
                                    and appender.exception() is None)

    async def _append(self, session) -> None:
        while (segment := await self._segments.get()) is not None:
            await session.append(segment)
        await session.append(end=True)


def _refused(appender: asyncio.Task) -> bool:
    """Whether appending failed in a way that must end the stream. NotFound means the server's request is
    gone: its stream is ending too, and its own end (an error, the frame limit) is what the caller hears."""
    if not appender.done() or appender.cancelled() or appender.exception() is None:
        return False
    return not isinstance(appender.exception(), NotFound)
