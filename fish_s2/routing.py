"""Client-side routing over several Triton replicas (torch-free).

A client given several endpoints (``TTSClient("10.0.0.1:8001,10.0.0.2:8001")``) asks a
:class:`Router` which replica to try, in order:

* ``affinity`` (default): a request with a voice id goes to the replica that owns the voice on a
  consistent-hash ring (``vnodes`` points per replica), so the voice's KV prefix stays hot there and
  adding or removing a replica moves only that replica's share of the voices; the next replicas on
  the ring are its fallbacks. A request without a voice goes to the replica with the fewest
  outstanding streams of this client (ties rotate).
* ``least``: every request by fewest outstanding streams. ``round_robin``: every request to the next
  replica in turn (the baseline of the fleet benchmark, ``perf/loadgen.py``).

A replica that answered :class:`~fish_s2.request.Unavailable` (unreachable, draining, or Busy: full)
goes to the back of the order for ``cooldown_s``. A request is retried on the next replica only
while it has produced no audio, never after (no audio is sent twice); errors other than
Unavailable are the request's own and are raised at once.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import TypeVar

from .request import Unavailable

POLICIES = ("affinity", "least", "round_robin")
T = TypeVar("T")


def parse_endpoints(url: str | Sequence[str]) -> list[str]:
    """``"a:8001,b:8001"`` or a list -> distinct endpoints in order."""
    items = [u.strip() for u in (url.split(",") if isinstance(url, str) else url)]
    endpoints = [u for u in items if u]
    if not endpoints or len(endpoints) != len(items):
        raise ValueError(f"url: expected one or more comma-separated host:port endpoints, got {url!r}")
    if len(set(endpoints)) != len(endpoints):
        raise ValueError(f"url: an endpoint is listed twice in {url!r}")
    return endpoints


def _hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class Router:
    def __init__(self, endpoints: str | Sequence[str], policy: str = "affinity", vnodes: int = 64,
                 cooldown_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        if policy not in POLICIES:
            raise ValueError(f"policy: expected one of {list(POLICIES)}, got {policy!r}")
        self.endpoints = parse_endpoints(endpoints)
        self.policy, self.cooldown_s, self._clock = policy, cooldown_s, clock
        ring = sorted((_hash(f"{ep}#{i}"), ep) for ep in self.endpoints for i in range(vnodes))
        self._ring_keys, self._ring_eps = [h for h, _ in ring], [ep for _, ep in ring]
        self.outstanding = dict.fromkeys(self.endpoints, 0)   # streams and calls open now
        self.served = dict.fromkeys(self.endpoints, 0)        # completed on each replica
        self.retries = 0                                      # attempts moved to another replica
        self._down_until = dict.fromkeys(self.endpoints, float("-inf"))
        self._turns = {policy: itertools.count() for policy in POLICIES}   # rotation: round robin, ties
        self._lock = threading.Lock()

    def owners(self, voice_id: str) -> list[str]:
        """Every endpoint, in ring order from the voice's point: its owner first, then its fallbacks."""
        start = bisect.bisect(self._ring_keys, _hash(voice_id))
        order: list[str] = []
        for i in range(len(self._ring_eps)):
            ep = self._ring_eps[(start + i) % len(self._ring_eps)]
            if ep not in order:
                order.append(ep)
                if len(order) == len(self.endpoints):
                    break
        return order

    def order(self, voice_id: str | Sequence[str] | None = None) -> list[str]:
        """The endpoints to try for one request, best first; replicas cooling down go last. A dialogue's
        voice list is one key (its prefix caches all of them, in order)."""
        n = len(self.endpoints)
        with self._lock:
            if self.policy == "affinity" and voice_id:
                base = self.owners(voice_id if isinstance(voice_id, str) else "\n".join(voice_id))
            elif self.policy == "round_robin":
                turn = next(self._turns["round_robin"]) % n
                base = self.endpoints[turn:] + self.endpoints[:turn]
            else:   # by outstanding streams; ties rotate over the requests that take this path only
                turn = next(self._turns["least"]) % n
                index = {ep: i for i, ep in enumerate(self.endpoints)}
                base = sorted(self.endpoints, key=lambda ep: (self.outstanding[ep], (index[ep] - turn) % n))
            now = self._clock()
            return [ep for ep in base if self._down_until[ep] <= now] + \
                   [ep for ep in base if self._down_until[ep] > now]

    def mark_down(self, endpoint: str) -> None:
        with self._lock:
            self._down_until[endpoint] = self._clock() + self.cooldown_s

    @contextlib.contextmanager
    def _track(self, endpoint: str):
        with self._lock:
            self.outstanding[endpoint] += 1
        try:
            yield
        finally:
            with self._lock:
                self.outstanding[endpoint] -= 1

    def _done(self, endpoint: str) -> None:
        with self._lock:
            self.served[endpoint] += 1

    def _refused(self, endpoint: str, retry: bool) -> bool:
        """Note a replica's Unavailable; whether to try the next replica."""
        self.mark_down(endpoint)
        if retry:
            with self._lock:
                self.retries += 1
        return retry

    # ------------------------------------------------------------------ running a request

    def stream(self, voice_id: str | None, open_stream: Callable[[str], Iterator[T]]) -> Iterator[T]:
        """The items of ``open_stream(endpoint)`` from the first replica that takes the request."""
        order = self.order(voice_id)
        for n, endpoint in enumerate(order):
            produced = False
            with self._track(endpoint), contextlib.closing(open_stream(endpoint)) as items:
                try:
                    for item in items:
                        produced = True
                        yield item
                except Unavailable:
                    if not self._refused(endpoint, retry=not produced and n < len(order) - 1):
                        raise
                    continue
            self._done(endpoint)
            return

    def call(self, voice_id: str | None, call: Callable[[str], T]) -> T:
        """``call(endpoint)`` on the first replica that takes it (a unary request: voices)."""
        order = self.order(voice_id)
        for n, endpoint in enumerate(order):
            with self._track(endpoint):
                try:
                    result = call(endpoint)
                except Unavailable:
                    if not self._refused(endpoint, retry=n < len(order) - 1):
                        raise
                    continue
            self._done(endpoint)
            return result
        raise AssertionError("unreachable")

    async def astream(self, voice_id: str | None, open_stream: Callable[[str], AsyncIterator[T]]) -> AsyncIterator[T]:
        order = self.order(voice_id)
        for n, endpoint in enumerate(order):
            produced = False
            with self._track(endpoint):
                async with contextlib.aclosing(open_stream(endpoint)) as items:
                    try:
                        async for item in items:
                            produced = True
                            yield item
                    except Unavailable:
                        if not self._refused(endpoint, retry=not produced and n < len(order) - 1):
                            raise
                        continue
            self._done(endpoint)
            return

    async def acall(self, voice_id: str | None, call: Callable[[str], Awaitable[T]]) -> T:
        order = self.order(voice_id)
        for n, endpoint in enumerate(order):
            with self._track(endpoint):
                try:
                    result = await call(endpoint)
                except Unavailable:
                    if not self._refused(endpoint, retry=n < len(order) - 1):
                        raise
                    continue
            self._done(endpoint)
            return result
        raise AssertionError("unreachable")
