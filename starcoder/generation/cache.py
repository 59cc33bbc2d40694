"""The KV cache: keys and values of every position decoded so far, per block.

Prompts of different lengths are left-padded to one length, so all rows write the same slot at
each step; `pad[b]` says how many leading positions of row b are padding (never attended to, and
the row's own positions count from its first real token). Buffers hold only the KV heads (MQA and
GQA caches are num_query_groups / num_attention_heads the size of the queries), on each rank its
own heads under tensor parallelism. With a sliding window of W the buffer is a rolling one of W
slots: position t lives in slot t % W.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, pad: torch.Tensor, capacity: int, window: int | None = None,
                 max_position: int | None = None):
        """`pad`: [batch] left padding per row; `capacity`: positions the timeline will reach;
        `max_position`: the model's position limit (rows that finished early and are still fed
        along with the others stay below it; their outputs are not used)."""
        self.pad = pad
        self.max_position = max_position
        self.window = window
        self.size = capacity if window is None else min(window, capacity)
        self.length = 0  # positions written so far (the same for every row)
        # The timeline position each slot holds (-1: empty); used by rolling buffers.
        self.slot_positions = torch.full((self.size,), -1, dtype=torch.long, device=pad.device)
        self.layers: dict[str, LayerCache] = {}
        self.timeline = torch.arange(capacity, device=pad.device)  # sliced, not rebuilt, per step
        self._mask = None

    def __getitem__(self, name: str) -> "LayerCache":
        if name not in self.layers:
            self.layers[name] = LayerCache(self)
        return self.layers[name]

    def positions(self, seq: int) -> torch.Tensor:
        """[batch, seq] position of each new token within its own row (padding clamps to 0)."""
        t = self.timeline[self.length: self.length + seq]
        top = None if self.max_position is None else self.max_position - 1
        return (t[None, :] - self.pad[:, None]).clamp(0, top)

    def advance(self, seq: int) -> None:
        """Call after each forward: `seq` new positions are now stored."""
        new = self.timeline[self.length: self.length + seq][-self.size:]
        self.slot_positions[new % self.size] = new
        self.length += seq
        self._mask = None

    def mask(self, seq: int) -> torch.Tensor:
        """[batch, seq, keys] True where a new query may attend (computed once per forward, for
        the keys `LayerCache.update` returns)."""
        if self._mask is None:
            new = self.timeline[self.length: self.length + seq]
            if self.window is None:
                keys = self.timeline[: self.length + seq]
            elif seq == 1:
                keys = self.slot_positions.clone()
                keys[self.length % self.size] = self.length
            else:
                keys = torch.cat([self.slot_positions, new])
            q, k = new[:, None], keys[None, :]
            allowed = (k >= 0) & (k <= q)
            if self.window is not None:
                allowed &= (q - k) < self.window
            allowed = allowed[None] & (k >= self.pad[:, None, None])
            # A padding query sees itself, so no row of the mask is empty (its output is unused).
            self._mask = allowed | (k == q)[None]
        return self._mask


class LayerCache:
    def __init__(self, cache: KVCache):
        self.cache = cache
        self.k = self.v = None

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """Store k, v [batch, seq, kv_heads, head_dim]; return (keys, values, mask) to attend over."""
        c, seq = self.cache, k.shape[1]
        if self.k is None:  # shapes, dtype and device come from the first call (local heads)
            shape = (k.shape[0], c.size, k.shape[2], k.shape[3])
            self.k, self.v = k.new_zeros(shape), v.new_zeros(shape)
        start = c.length
        if c.window is None:  # a flat buffer: write in place, attend over the filled part
            end = start + seq
            self.k[:, start: end] = k
            self.v[:, start: end] = v
            return self.k[:, :end], self.v[:, :end], c.mask(seq)
        if seq == 1:  # rolling buffer, one token: write in place; the slot it overwrites holds
            # position t - W, already outside the window of query t
            slot = start % c.size
            self.k[:, slot: slot + 1] = k
            self.v[:, slot: slot + 1] = v
            return self.k, self.v, c.mask(seq)
        # Rolling buffer, several tokens: the new queries see the buffer's slots and each other;
        # then the last `size` positions overwrite their slots.
        keys, values = torch.cat([self.k, k], 1), torch.cat([self.v, v], 1)
        kept = c.timeline[start: start + seq][-c.size:] % c.size
        self.k[:, kept], self.v[:, kept] = k[:, -c.size:], v[:, -c.size:]
        return keys, values, c.mask(seq)


def kv_bytes_per_token(num_layers: int, num_query_groups: int, head_dim: int, bytes_per_value: int = 2) -> int:
    """Cache bytes one position costs: keys and values of every KV head in every layer."""
    return 2 * num_layers * num_query_groups * head_dim * bytes_per_value
