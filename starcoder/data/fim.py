"""Fill-in-the-middle on packed samples (spec §4): StarCoder's character-level FIM per EOD segment
and StarCoder2's repository-level FIM (split on `<file_sep>`, then FIM each fragment).

Differences from bigcode Megatron, on purpose: draws come from a generator made per sample (seed,
stream, epoch, sample index), so the stream is the same for any number of loader workers and after
resume; and the parts are re-encoded only around the cuts (`PartEncoder`), which is exactly equal
to re-encoding them whole.

Re-encoding around the cuts. BPE encodes each pre-token on its own, so tokens can be reused
wherever the pre-tokenisation of a part agrees with that of the original text. The pre-token that
contains a cut is not enough: the GPT-2 regex's contractions and its whitespace look-ahead move
neighbouring boundaries on both sides (a cut before `'` in `d['size']` turns `['`+`size` into
`[`+`'s`+`ize`; a prefix that ends in indentation merges it into one pre-token). What never moves
is a boundary between a printable ASCII character and ASCII whitespace (a "hard" boundary):

  1. A pre-token containing a non-space character cannot extend into following whitespace (no
     alternative of the regex matches non-space then space; `Digits` splits only isolate digits),
     so every string has a pre-token boundary there.
  2. The regex has no look-behind, so the pre-tokens after a boundary depend only on the text
     after it; and the pre-token before it ends in a non-space character, so the only look-ahead
     that reads past it (`\\s+(?!\\S)`, which ends whitespace runs) is not involved: the pre-tokens
     before it depend only on the text before it.
  3. No special token contains whitespace, so the added-token split cannot straddle it.

Hence encode(s) = encode(s[:h]) + encode(s[h:]) at every hard boundary h of any string s. A part
s = x[a:b] of the decoded segment x keeps the original tokens between its first and last hard
boundary in [a, b] (the original document's encoding splits there too) and re-encodes only from a to the
first and from the last to b: the re-pre-tokenised window grows outward from each cut until it
reaches a boundary where the original and the cut pre-tokenisations provably coincide. Hard
boundaries are found from token tables alone: a token ending in printable ASCII followed by one
starting with ASCII whitespace. The tokens are reused only when (i) the tokenizer is a byte-level
BPE with that pre-tokeniser, no normaliser and no dropout, (ii) the character offsets computed
from the tables add up to the decoded length, and (iii) every special-token string in the decoded
text is a special token in the segment (data preprocessed with escaped special strings falls
back); otherwise the part is re-encoded whole. Tests check equality with full re-encoding on real
code, cuts in whitespace runs, digits, quotes, multi-byte characters and split characters (U+FFFD).
"""

from __future__ import annotations

import random
import re
from typing import Optional

import numpy as np

from starcoder.data.tokenizer import HFTokenizer, Tokenizer

ASCII_WS = b" \t\n\r"


def sample_rng(seed: int, stream: int, epoch: int, index: int) -> random.Random:
    """The generator for one sample: a pure function of (seed, stream, epoch, index)."""
    key = (((seed & (2**64 - 1)) << 16 | stream & 0xFFFF) << 32 | epoch & (2**32 - 1)) << 64 | index
    return random.Random(key)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def fast_path_supported(tokenizer: Tokenizer) -> tuple[bool, str]:
    """Whether the pipeline is one for which hard boundaries are proven (see module docstring)."""
    if not isinstance(tokenizer, HFTokenizer):
        return False, "not a tokenizers byte-level BPE"
    cfg = tokenizer.config()
    model, pre = cfg.get("model") or {}, cfg.get("pre_tokenizer") or {}
    if cfg.get("normalizer") is not None:
        return False, "has a normalizer"
    if model.get("type") != "BPE" or model.get("dropout") not in (None, 0.0):
        return False, "model is not a BPE without dropout"
    if (cfg.get("decoder") or {}).get("type") != "ByteLevel":
        return False, "decoder is not ByteLevel"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if not steps or steps[-1].get("type") != "ByteLevel" or any(s.get("type") != "Digits" for s in steps[:-1]):
        return False, "pre-tokenizer is not [Digits,] ByteLevel"
    last = steps[-1]
    if last.get("add_prefix_space") or not last.get("use_regex", True):
        return False, "ByteLevel adds a prefix space or does not use the GPT-2 regex"
    if any(any(c.isspace() for c in t["content"]) for t in cfg.get("added_tokens", [])):
        return False, "a special token contains whitespace"
    return True, ""


class PartEncoder:
    """encode(x[a:b]) for parts of a decoded segment x, reusing the segment's tokens between hard
    boundaries when that is proven equal (`fast`), else by encoding the part whole."""

    def __init__(self, tokenizer: Tokenizer, fast: bool = True):
        self.tokenizer = tokenizer
        self.fast, self.why_slow = fast_path_supported(tokenizer) if fast else (False, "disabled")
        specials = tokenizer.special_tokens
        self.special_re = (re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True))))
                           if specials else None)
        if not self.fast:
            return
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
        size = max(vocab.values()) + 1
        self.token_bytes: list[bytes] = [b""] * size
        for token, tid in vocab.items():
            if token in specials:
                self.token_bytes[tid] = token.encode("utf-8")
            else:
                self.token_bytes[tid] = bytes(byte_of[c] for c in token)
        tb = self.token_bytes
        # characters per token: bytes that are not UTF-8 continuation bytes
        self.chars = np.array([sum((b & 0xC0) != 0x80 for b in t) for t in tb], dtype=np.int64)
        self.ends_graphic = np.array([bool(t) and 0x21 <= t[-1] <= 0x7E for t in tb])
        self.starts_ws = np.array([bool(t) and t[0] in ASCII_WS for t in tb])
        self.is_special = np.zeros(size, dtype=bool)
        self.is_special[list(specials.values())] = True

    def encode_whole(self, texts: list[str]) -> list[list[int]]:
        # One by one on the calling thread: a thread pool for a handful of short strings costs
        # more than it saves and competes with the trainer's threads.
        return [self.tokenizer.encode(t) for t in texts]

    def parts(self, seg: np.ndarray, text: str, cuts: list[int]) -> list[list[int]]:
        """Tokens of text[cuts[i]:cuts[i+1]] for each i (cuts are character offsets)."""
        spans = list(zip(cuts[:-1], cuts[1:]))
        plan = self._plan(seg, text, spans) if self.fast else None
        if plan is None:
            return self.encode_whole([text[a:b] for a, b in spans])
        texts = [t for head, _, tail in plan for t in (head, tail) if t]
        encoded = iter(self.encode_whole(texts))
        out = []
        for head, middle, tail in plan:
            ids = next(encoded) if head else []
            if middle is not None:
                ids = ids + middle.tolist()
            if tail:
                ids = ids + next(encoded)
            out.append(ids)
        return out

    def _plan(self, seg: np.ndarray, text: str, spans):
        """Per span (head text, reused tokens or None, tail text), or None to encode whole."""
        n = len(seg)
        if n < 2:
            return None
        if self.special_re is not None:  # condition (iii)
            if len(self.special_re.findall(text)) != int(self.is_special[seg].sum()):
                return None
        chars = self.chars[seg]
        # leading UTF-8 continuation bytes (a character split by the sample edge) decode to one
        # U+FFFD each but count zero in `chars`
        orphans, k = 0, 0
        while k < min(n, 3):
            t = self.token_bytes[seg[k]]
            lead = len(t) - len(t.lstrip(bytes(range(0x80, 0xC0))))
            orphans += lead
            if lead < len(t):
                break
            k += 1
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(chars, out=offsets[1:])
        if offsets[-1] + orphans != len(text):  # condition (ii)
            return None
        hard = np.flatnonzero(self.ends_graphic[seg[:-1]] & self.starts_ws[seg[1:]]) + 1  # token idx
        pos = offsets[hard] + orphans  # their character offsets
        plan = []
        for a, b in spans:
            lo, hi = np.searchsorted(pos, a, side="left"), np.searchsorted(pos, b, side="right")
            if lo >= hi:  # no hard boundary in [a, b]: encode the span whole
                plan.append((text[a:b], None, ""))
                continue
            first, last = int(pos[lo]), int(pos[hi - 1])
            plan.append((text[a:first], seg[hard[lo]:hard[hi - 1]], text[last:b]))
        return plan


class FimTransform:
    """Apply FIM to packed samples of `seq_length + 1` tokens, keeping their length."""

    def __init__(self, tokenizer: Tokenizer, rate: float, spm_rate: float = 0.5,
                 split_token: Optional[str] = None, fragment_rate: float = 0.5, fast: bool = True):
        self.tokenizer = tokenizer
        self.rate, self.spm_rate, self.fragment_rate = rate, spm_rate, fragment_rate
        ids = tokenizer.fim_ids()
        self.prefix, self.middle, self.suffix, self.pad = ids.prefix, ids.middle, ids.suffix, ids.pad
        self.eod = tokenizer.eod_id
        self.split_id = tokenizer.require(split_token, why="data.fim_split_sample") if split_token else None
        self.encoder = PartEncoder(tokenizer, fast=fast)

    def __call__(self, sample: np.ndarray, rng: random.Random) -> np.ndarray:
        length = len(sample)
        sample = np.asarray(sample, dtype=np.int64)
        pieces, start = [], 0
        for end in [*np.flatnonzero(sample == self.eod).tolist(), length]:
            if end > start:
                pieces.append(self._segment(sample[start:end], rng))
            if end < length:
                pieces.append(sample[end:end + 1])
            start = end + 1
        out = np.concatenate(pieces) if pieces else sample
        if len(out) > length:  # context-level fix: drop the tail, or pad with <fim_pad>
            out = out[:length]
        elif len(out) < length:
            out = np.concatenate([out, np.full(length - len(out), self.pad, dtype=np.int64)])
        return out

    def _segment(self, seg: np.ndarray, rng: random.Random) -> np.ndarray:
        if self.split_id is None or not (seg == self.split_id).any():
            return self.permute(seg, self.rate, rng)
        if rng.random() >= self.rate:  # the repository-level decision
            return seg
        pieces, start = [], 0
        for end in [*np.flatnonzero(seg == self.split_id).tolist(), len(seg)]:
            if end > start:
                pieces.append(self.permute(seg[start:end], self.fragment_rate, rng))
            if end < len(seg):
                pieces.append(seg[end:end + 1])
            start = end + 1
        return np.concatenate(pieces)

    def permute(self, seg: np.ndarray, rate: float, rng: random.Random) -> np.ndarray:
        """One segment: with probability `rate`, cut its text at two uniform character offsets and
        emit SPM (`<pre><suf>S<mid>P M`) with probability spm_rate, else PSM (`<pre>P<suf>S<mid>M`)."""
        if rng.random() >= rate:
            return seg
        text = self.tokenizer.decode(seg.tolist())
        b0, b1 = sorted((rng.randint(0, len(text)), rng.randint(0, len(text))))
        prefix, middle, suffix = self.encoder.parts(seg, text, [0, b0, b1, len(text)])
        if rng.random() < self.spm_rate:
            ids = [self.prefix, self.suffix, *suffix, self.middle, *prefix, *middle]
        else:
            ids = [self.prefix, *prefix, self.suffix, *suffix, self.middle, *middle]
        return np.array(ids, dtype=np.int64)
