"""Voice prefix cache: the slow AR's KV of a voice's system block, computed once and reused.

Keyed by content -- the token ids *and all codebook rows* of the prefix -- so two voices whose
references differ only in residual codes never share KV (token ids alone carry only codebook 0).
Bounded in bytes, least recently used first out.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

from torch import Tensor


def prefix_key(prefix: Tensor, model_tag: str = "") -> str:
    """Content hash of a prefix [num_codebooks + 1, P] (ids and codes), salted with the model/dtype tag."""
    data = prefix.detach().to("cpu").long().contiguous().numpy().tobytes()
    return hashlib.sha256(model_tag.encode() + str(tuple(prefix.shape)).encode() + data).hexdigest()


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: str) -> Tensor | None:
        with self._lock:
            kv = self._entries.get(key)
            if kv is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return kv

    def put(self, key: str, kv: Tensor) -> None:
        """Store a prefix's KV [n_layer, 2, n_kv_heads, P, head_dim]; entries larger than the cache are skipped."""
        size = kv.numel() * kv.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                return
            while self.bytes + size > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()
                self.evictions += 1
            self._entries[key] = kv
            self.bytes += size

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self.bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions}
