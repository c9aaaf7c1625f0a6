"""The paged KV cache's bookkeeping: block allocation, reference counts and prefix caching.

Owns which physical cache block holds which request's tokens. A request's K/V for position ``p``
live in block ``block_ids[p // block_size]`` at offset ``p % block_size``. Blocks are
reference-counted so that requests sharing a prompt prefix share its *full* blocks: each full
block is named by a hash chained over every token up to its end (``(parent_hash, tokens)``), and
a freed block keeps its name until it is reused, so a later request with the same prefix finds
it. Free blocks form one LRU queue (never-used and cached-but-unreferenced alike); allocation
takes the least recently freed block and forgets its name.

Knows nothing about devices, the model or scheduling policy: it answers "can these tokens get
slots?" and "which prefix is already cached?".
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence

from .request import Request


def kv_bytes_per_block(*, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                       dtype_bytes: int = 2) -> int:
    """Bytes one block takes in the cache: K and V for every layer."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype_bytes


def num_blocks_for_budget(budget_bytes: int, bytes_per_block: int) -> int:
    """How many blocks fit in ``budget_bytes`` (at least one)."""
    if budget_bytes < bytes_per_block:
        raise ValueError(f"KV-cache budget {budget_bytes} B is smaller than one block "
                         f"({bytes_per_block} B)")
    return budget_bytes // bytes_per_block


class BlockManager:
    """Reference-counted block allocator with a hash-named prefix cache.

    Example:
      >>> bm = BlockManager(num_blocks=8, block_size=4)
      >>> r = Request("a", [1, 2, 3, 4, 5], params, seed=0, stop_ids=frozenset())
      >>> bm.acquire_prefix(r); bm.allocate_slots(r, r.num_tokens_to_compute)
    """

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"{num_blocks=} and {block_size=} must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._key_of: list[tuple | None] = [None] * num_blocks   # cache key of a full block
        self._cached: dict[tuple, int] = {}                      # cache key -> block id
        self._free: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(
            range(num_blocks))                                   # LRU first
        self._hashes: dict[str, list[int]] = {}                  # request -> chain hashes
        self.prefix_queries = 0                                   # tokens looked up
        self.prefix_hits = 0                                      # tokens found

    # ---- accounting ----
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one live request."""
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks that carry a prefix-cache name (referenced or not)."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        total = math.ceil((req.num_computed_tokens + num_new_tokens) / self.block_size)
        return max(0, total - len(req.block_ids))

    # ---- prefix cache ----
    def _chain(self, req: Request, upto_blocks: int) -> list[int]:
        """Chain hashes of the first ``upto_blocks`` full blocks of ``req.token_ids``."""
        hashes = self._hashes.setdefault(req.request_id, [])
        bs = self.block_size
        while len(hashes) < upto_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else 0
            hashes.append(hash((parent, tuple(req.token_ids[i * bs:(i + 1) * bs]))))
        return hashes[:upto_blocks]

    def _key(self, req: Request, i: int) -> tuple:
        bs = self.block_size
        parent = self._hashes[req.request_id][i - 1] if i else 0
        return parent, tuple(req.token_ids[i * bs:(i + 1) * bs])

    def acquire_prefix(self, req: Request) -> int:
        """Give a request with no blocks the longest cached prefix of its tokens.

        At least one token is always left to compute (its logits are needed), so a fully cached
        prompt reuses all but its last block. Returns the number of tokens reused and sets
        ``req.num_computed_tokens`` accordingly.
        """
        assert not req.block_ids and req.num_computed_tokens == 0, req.request_id
        if not self.enable_prefix_caching:
            return 0
        n_full = (len(req.token_ids) - 1) // self.block_size
        self._chain(req, n_full)
        hit: list[int] = []
        for i in range(n_full):
            block = self._cached.get(self._key(req, i))
            if block is None:
                break
            hit.append(block)
        for block in hit:
            if self._ref[block] == 0:
                del self._free[block]
            self._ref[block] += 1
        req.block_ids = hit
        req.num_computed_tokens = len(hit) * self.block_size
        self.prefix_queries += len(req.token_ids)
        self.prefix_hits += req.num_computed_tokens
        return req.num_computed_tokens

    def cache_full_blocks(self, req: Request) -> None:
        """Name the request's blocks that are now full (after its computed tokens grew)."""
        if not self.enable_prefix_caching:
            return
        n_full = req.num_computed_tokens // self.block_size
        self._chain(req, n_full)
        for i in range(n_full):
            block = req.block_ids[i]
            if self._key_of[block] is not None:
                continue
            key = self._key(req, i)
            if key in self._cached:   # an identical block computed concurrently keeps the name
                continue
            self._key_of[block] = key
            self._cached[key] = block

    # ---- allocation ----
    def allocate_slots(self, req: Request, num_new_tokens: int) -> bool:
        """Make room for ``num_new_tokens`` more tokens of ``req``; False (no change) if full."""
        need = self.blocks_needed(req, num_new_tokens)
        if need > len(self._free):
            return False
        for _ in range(need):
            block, _ = self._free.popitem(last=False)
            if (key := self._key_of[block]) is not None:    # evict its prefix-cache name
                del self._cached[key]
                self._key_of[block] = None
            self._ref[block] = 1
            req.block_ids.append(block)
        return True

    def free(self, req: Request) -> None:
        """Drop the request's references; its tail blocks become the first to be evicted."""
        for block in reversed(req.block_ids):
            self._ref[block] -= 1
            assert self._ref[block] >= 0, block
            if self._ref[block] == 0:
                self._free[block] = None
        req.block_ids = []
        req.num_computed_tokens = 0
        self._hashes.pop(req.request_id, None)

    def reset_prefix_cache(self) -> None:
        """Forget every name (used blocks stay allocated)."""
        self._cached.clear()
        self._key_of = [None] * self.num_blocks

    def block_table(self, reqs: Sequence[Request]) -> list[list[int]]:
        return [list(r.block_ids) for r in reqs]
