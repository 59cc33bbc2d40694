"""Prefill, then decode with a KV cache, batched over prompts of different lengths.

`generate_ids` works on token ids; `Generator` on text: it cuts prompts that do not fit the
context, stops at stop sequences, and builds fill-in-the-middle prompts in the model's format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from starcoder.generation.cache import KVCache
from starcoder.generation.sampling import Sampling, next_tokens

# Special tokens that end a completion besides EOS (present in StarCoder-family tokenizers).
END_TOKENS = ("<|endoftext|>", "<file_sep>", "<fim_pad>")


@torch.inference_mode()
def generate_ids(model, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int],
                 stop_ids: set[int], sampling: Sampling = Sampling(), pad_id: int = 0,
                 stopped: Callable[[int, list[int]], bool] | None = None,
                 use_cache: bool = True) -> list[list[int]]:
    """New tokens per prompt: at most `max_new_tokens[i]`, ending at (and including) a stop id,
    or when `stopped(i, new_ids)` says so. `use_cache=False` recomputes the whole sequence at
    every step (the reference the cache is tested and measured against)."""
    device = next(model.parameters()).device
    generator = None
    if not sampling.greedy:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    longest = max(len(p) for p in prompts)
    steps = max(max_new_tokens)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
    pad = torch.tensor([longest - len(p) for p in prompts], device=device)
    out: list[list[int]] = [[] for _ in prompts]
    done = [n <= 0 for n in max_new_tokens]
    limit = model.cfg.max_position_embeddings
    cache = KVCache(pad, longest + steps, model.cfg.sliding_window, limit) if use_cache else None
    sequence = ids
    logits = _last_logits(model, ids, cache, pad)
    for _ in range(steps):
        if all(done):
            break
        token = next_tokens(logits, sampling, generator)
        for i, t in enumerate(token.tolist()):
            if done[i]:
                continue
            out[i].append(t)
            done[i] = (t in stop_ids or len(out[i]) >= max_new_tokens[i]
                       or (stopped is not None and stopped(i, out[i])))
        if all(done):
            break
        if cache is not None:
            logits = _last_logits(model, token[:, None], cache, pad)
        else:
            sequence = torch.cat([sequence, token[:, None]], 1)
            logits = _last_logits(model, sequence, None, pad)
    return out


def _last_logits(model, ids: torch.Tensor, cache: KVCache | None, pad: torch.Tensor) -> torch.Tensor:
    if cache is None:  # full recompute: a fresh cache per call gives the padding its mask
        cache_once = KVCache(pad, ids.shape[1], model.cfg.sliding_window,
                             model.cfg.max_position_embeddings)
        return model(ids, cache=cache_once, last_only=True)[:, -1].float()
    logits = model(ids, cache=cache, last_only=True)[:, -1].float()
    cache.advance(ids.shape[1])
    return logits


@dataclass
class Completion:
    prompt: str
    text: str  # the new text, cut before the first stop sequence
    tokens: list[int] = field(default_factory=list)
    truncated: bool = False  # the prompt was cut from the left to fit the context
    too_long: bool = False  # the prompt left no room for new tokens: nothing was generated


class Generator:
    """Text in, text out, for one model and tokenizer (any `Tokenizer` of starcoder.data)."""

    def __init__(self, model, tokenizer, context: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.context = context or model.cfg.max_position_embeddings
        self.stop_ids = {i for i in (tokenizer.token_to_id(t) for t in END_TOKENS) if i is not None}
        self.stop_ids.add(model.cfg.eos_token_id)
        self.pad_id = model.cfg.eos_token_id

    def complete(self, prompts: Sequence[str], max_new_tokens: int = 128,
                 sampling: Sampling = Sampling(), stop: Sequence[str] = (),
                 batch_size: int = 8, use_cache: bool = True,
                 progress: Callable[[int], None] | None = None) -> list[Completion]:
        """One completion per prompt (repeat a prompt for several samples). Prompts longer than
        the context are cut from the left, keeping their end; one that leaves no room for a new
        token gets an empty completion marked `too_long`."""
        results: list[Completion | None] = [None] * len(prompts)
        encoded = self.tokenizer.encode_batch(list(prompts))
        work = []
        for i, ids in enumerate(encoded):
            truncated = len(ids) > self.context
            ids = ids[-self.context:]
            room = min(max_new_tokens, self.context - len(ids))
            if room <= 0:
                results[i] = Completion(prompts[i], "", truncated=truncated, too_long=True)
            else:
                work.append((i, ids, room, truncated))
        for start in range(0, len(work), batch_size):
            batch = work[start: start + batch_size]
            seed_sampling = Sampling(sampling.temperature, sampling.top_p, sampling.top_k,
                                     sampling.seed + start)
            stopped = self._stop_check(stop) if stop else None
            new = generate_ids(self.model, [b[1] for b in batch], [b[2] for b in batch],
                               self.stop_ids, seed_sampling, self.pad_id, stopped, use_cache)
            for (i, _, _, truncated), tokens in zip(batch, new):
                text = self.tokenizer.decode([t for t in tokens if t not in self.stop_ids])
                results[i] = Completion(prompts[i], cut_at_stop(text, stop), tokens, truncated)
            if progress is not None:
                progress(len(batch))
        return results

    def fim_prompt(self, prefix: str, suffix: str) -> str:
        """Prefix-suffix-middle, as StarCoder and StarCoder2 were trained (`<fim_prefix>`...)."""
        tok = self.tokenizer
        p, s, m = (_token_text(tok, tok.fim_id(n)) for n in ("prefix", "suffix", "middle"))
        return f"{p}{prefix}{s}{suffix}{m}"

    def _stop_check(self, stop: Sequence[str]):
        def stopped(_row: int, ids: list[int]) -> bool:
            # Checked after every token, so a stop sequence can only have just ended.
            text = self.tokenizer.decode(ids[-16:])
            return any(s in text for s in stop)
        return stopped


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the earliest stop sequence (the harness's `stop_at_stop_token`)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def _token_text(tokenizer, token_id: int) -> str:
    return next(t for t, i in tokenizer.special_tokens.items() if i == token_id)
