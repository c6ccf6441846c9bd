"""The KV page pool's bookkeeping (host side): free pages, reference counts, prefix hashes.

The device holds the pages themselves (`paged_attention.empty_pages`); this module only
decides which page ids a sequence owns. Page 0 is the trash page and never handed out.

Prefix caching: once a page is full, it is registered under a hash of every token up to
its end (a chain: the page's tokens and its predecessor's hash), so another sequence
whose prompt starts with the same tokens shares the page instead of recomputing it.
Shared pages are reference-counted; a page nobody holds stays cached (and reusable)
until the pool needs it, oldest first.
"""
from __future__ import annotations

import collections
import hashlib
import math
from typing import Sequence

import numpy as np

from zerojax.inference.paged_attention import TRASH_PAGE


def bytes_per_token(geometry, dtype_bytes: int) -> int:
    """K and V of every layer for one token: 2 x layers x kv_heads x head_dim x dtype bytes."""
    return 2 * geometry.layers * geometry.kv_heads * geometry.head_dim * dtype_bytes


def pages_for(tokens: int, page_size: int) -> int:
    return math.ceil(tokens / page_size)


def page_hashes(tokens: Sequence[int], page_size: int, count: int) -> list[bytes]:
    """Chained hashes of the first `count` full pages of `tokens`."""
    out, parent = [], b""
    ids = np.asarray(tokens[:count * page_size], np.int64)
    for i in range(count):
        parent = hashlib.blake2b(parent + ids[i * page_size:(i + 1) * page_size].tobytes(),
                                 digest_size=16).digest()
        out.append(parent)
    return out


class PagePool:
    """Page ids 1..num_pages: who holds them, and which full pages are cached by prefix."""

    def __init__(self, num_pages: int, page_size: int, *, prefix_caching: bool = True):
        self.num_pages, self.page_size, self.prefix_caching = num_pages, page_size, prefix_caching
        self.refcount = np.zeros(num_pages + 1, np.int32)
        self.free: collections.deque[int] = collections.deque(range(1, num_pages + 1))
        self.by_hash: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        self.evictable: collections.OrderedDict[int, None] = collections.OrderedDict()   # cached, unheld; LRU first
        self.hits = 0                # tokens served from cached pages (a metric)

    # ---- capacity
    def available(self) -> int:
        """Pages that can be handed out now (free, or cached and held by nobody)."""
        return len(self.free) + len(self.evictable)

    def used(self) -> int:
        return self.num_pages - self.available()

    # ---- holding pages
    def allocate(self) -> int:
        if self.free:
            page = self.free.popleft()
        elif self.evictable:
            page, _ = self.evictable.popitem(last=False)
            del self.by_hash[self.hash_of.pop(page)]
        else:
            raise RuntimeError("the KV page pool is exhausted (the scheduler checks before allocating)")
        self.refcount[page] = 1
        return page

    def release(self, pages: Sequence[int]) -> None:
        for page in pages:
            self.refcount[page] -= 1
            if self.refcount[page] == 0:
                if page in self.hash_of:
                    self.evictable[page] = None
                else:
                    self.free.append(page)

    # ---- prefix caching
    def match_prefix(self, tokens: Sequence[int]) -> list[int]:
        """Cached pages holding a prefix of `tokens`, now also held by the caller.

        At most (len - 1) // page_size pages: the last token is always computed, since
        its logits give the first new token.
        """
        if not self.prefix_caching:
            return []
        matched = []
        for digest in page_hashes(tokens, self.page_size, (len(tokens) - 1) // self.page_size):
            page = self.by_hash.get(digest)
            if page is None:
                break
            matched.append(page)
        for page in matched:
            if self.refcount[page] == 0:
                del self.evictable[page]
            self.refcount[page] += 1
        self.hits += len(matched) * self.page_size
        return matched

    def register(self, pages: Sequence[int], tokens: Sequence[int], full_pages: int, already: int) -> None:
        """Record pages `already`..`full_pages - 1` of a sequence (now full) under their hashes."""
        if not self.prefix_caching or full_pages <= already:
            return
        for index, digest in enumerate(page_hashes(tokens, self.page_size, full_pages)):
            page = pages[index]
            if index < already or page in self.hash_of or digest in self.by_hash:
                continue
            self.by_hash[digest] = page
            self.hash_of[page] = digest

    def check(self) -> None:
        """Invariants (tests): every page is free, cached-unheld or held, exactly once."""
        held = {p for p in range(1, self.num_pages + 1) if self.refcount[p] > 0}
        free, cached = set(self.free), set(self.evictable)
        assert TRASH_PAGE not in held | free | cached
        assert not (held & free) and not (held & cached) and not (free & cached)
        assert held | free | cached == set(range(1, self.num_pages + 1))
