"""One tokenizer interface over Hugging Face `tokenizers` (tokenizer.json) and sentencepiece.

`load_tokenizer(spec)` takes a tokenizer.json, a sentencepiece `.model`, a folder holding one,
or `builtin:tiny` (the tiny presets' tokenizer shipped in `starcoder/assets/tokenizers/tiny`).
Special tokens are looked up by name; FIM sentinels also under SantaCoder's hyphenated names.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Sequence

from starcoder.config import UserError

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "tokenizers"
# A text longer than twice this many characters is encoded in pieces of about this size, cut
# where the pre-tokenizer would cut anyway: the same ids in bounded memory (a 50 MB line encoded
# whole holds gigabytes of per-token objects).
PIECE_CHARS = 1 << 16
PIECES_PER_BATCH = 16
# An ASCII punctuation mark other than the apostrophe, then an ASCII letter: the GPT-2 regex ends
# a pre-token there whatever surrounds the pair (only `'s`-style contractions join punctuation to
# letters), so such a cut needs no look at the text before it.
PUNCT_LETTER = re.compile(r"[!-&(-/:-@\[-`{-~][A-Za-z]")
EOD = "<|endoftext|>"
# name -> spellings tried in order: StarCoder/StarCoder2 first, then SantaCoder's hyphenated one.
FIM_TOKENS = {
    "prefix": ("<fim_prefix>", "<fim-prefix>"),
    "middle": ("<fim_middle>", "<fim-middle>"),
    "suffix": ("<fim_suffix>", "<fim-suffix>"),
    "pad": ("<fim_pad>", "<fim-pad>"),
}


class MissingTokenError(UserError):
    """The tokenizer lacks a special token that the requested feature needs."""


class FimIds(NamedTuple):
    prefix: int
    middle: int
    suffix: int
    pad: int


class Tokenizer:
    """What the data path and the trainer need from a tokenizer.

    `encode` adds no special tokens (no BOS/EOS from a post-processor); literal special-token
    strings in the text become their special ids, as `tokenizers` does by default. `decode` is the
    raw `tokenizers` decode: special tokens are kept as text and no clean-up is applied, so
    `decode(encode(text)) == text` for byte-level BPE.
    """

    name: str
    path: Path  # the file it was read from
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str], escape_special: bool = False) -> list[list[int]]:
        """Encode many texts; with `escape_special`, literal special-token strings are encoded as
        ordinary text (where the tokenizer supports it)."""
        return [self.encode(t) for t in texts]

    def encode_long(self, text: str, escape_special: bool = False) -> Iterator[list[int]]:
        """The ids of `text` in consecutive parts (their concatenation is the whole encoding);
        tokenizers that cannot be cut safely yield it whole."""
        yield from self.encode_batch([text], escape_special=escape_special)

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def tokens_by_id(self) -> list[str]:
        """Every token's string, in id order (the vocabulary)."""
        raise NotImplementedError

    @functools.cached_property
    def fingerprint(self) -> str:
        """A hash of the vocabulary (every token string with its id): equal for the same
        tokenizer however its file is formatted, different when any id means another token."""
        return hashlib.sha256(json.dumps(self.tokens_by_id()).encode()).hexdigest()

    def token_to_id(self, token: str) -> Optional[int]:
        raise NotImplementedError

    def save(self, folder: str | Path) -> Path:
        """Write the tokenizer file(s) into `folder`; returns the main file's path."""
        raise NotImplementedError

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special (added) tokens: content -> id."""
        raise NotImplementedError

    @property
    def eod_id(self) -> int:
        return self.require(EOD, why="documents end with it")

    def require(self, token: str, why: str = "") -> int:
        tid = self.token_to_id(token)
        if tid is None:
            reason = f" ({why})" if why else ""
            raise MissingTokenError(f"tokenizer {self.name} has no {token} token{reason}")
        return tid

    def fim_id(self, name: str) -> int:
        """The id of a FIM sentinel by name (`prefix`, `middle`, `suffix`, `pad`)."""
        spellings = FIM_TOKENS[name]
        for token in spellings:
            tid = self.token_to_id(token)
            if tid is not None:
                return tid
        raise MissingTokenError(
            f"tokenizer {self.name} has no {spellings[0]} token (nor SantaCoder's {spellings[1]}); "
            "fill-in-the-middle needs <fim_prefix>, <fim_middle>, <fim_suffix> and <fim_pad>")

    def fim_ids(self) -> FimIds:
        return FimIds(*(self.fim_id(n) for n in ("prefix", "middle", "suffix", "pad")))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size})"


class HFTokenizer(Tokenizer):
    """A `tokenizers` tokenizer.json."""

    def __init__(self, path: str | Path, name: Optional[str] = None):
        from tokenizers import Tokenizer as RustTokenizer

        self.path = Path(path)
        self.name = name or str(self.path)
        try:
            self.backend = RustTokenizer.from_file(str(self.path))
        except Exception as err:  # `tokenizers` raises a bare Exception for any unreadable file
            raise UserError(f"{self.path}: not a tokenizer ({' '.join(str(err).split())}); expected "
                            "a Hugging Face tokenizer.json or a sentencepiece .model") from None
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        self._special = {t.content: i for i, t in self.backend.get_added_tokens_decoder().items()
                         if t.special}
        self._escaping = None  # a second instance that encodes special-token strings as text

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], escape_special: bool = False) -> list[list[int]]:
        """Encode many texts (in parallel unless TOKENIZERS_PARALLELISM=false); with
        `escape_special`, literal special-token strings are encoded as ordinary text."""
        backend = self.escaping_backend() if escape_special else self.backend
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def encode_long(self, text: str, escape_special: bool = False) -> Iterator[list[int]]:
        """Cut at added-token occurrences (which `tokenizers` splits off first), then inside each
        section about every PIECE_CHARS characters: after an ASCII punctuation mark followed by a
        letter (PUNCT_LETTER), else at a pre-token start, found by pre-tokenizing from the piece's
        start, that follows a non-space character. At both the GPT-2 regex and `Digits` cut the
        same way with or without the text on either side (the match before ends in a non-space
        character, so no look-ahead is involved; there is no look-behind), and BPE never merges
        across a pre-token. So the ids equal encoding the text whole (tested on 2 MB lines)."""
        if len(text) <= 2 * PIECE_CHARS or not self._cuttable:
            yield from self.encode_batch([text], escape_special=escape_special)
            return
        batch: list[str] = []
        for piece in self._pieces(text, escape_special):
            batch.append(piece)
            if len(batch) == PIECES_PER_BATCH:
                yield from self.encode_batch(batch, escape_special=escape_special)
                batch = []
        if batch:
            yield from self.encode_batch(batch, escape_special=escape_special)

    @functools.cached_property
    def _cuttable(self) -> bool:
        """StarCoder's pipeline: no normaliser, the GPT-2 regex (`ByteLevel`, no prefix space),
        optionally after `Digits`, and no added token that strips or matches whole words. Then
        pieces encode exactly as their spans of the whole text."""
        pre = self.config().get("pre_tokenizer") or {}
        steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
        regex = [s for s in steps if s.get("type") == "ByteLevel"]
        added = self.backend.get_added_tokens_decoder().values()
        return (self.backend.normalizer is None and len(regex) == 1
                and regex[0].get("use_regex", True) and not regex[0].get("add_prefix_space")
                and all(s.get("type") in ("ByteLevel", "Digits") for s in steps)
                and not any(t.lstrip or t.rstrip or t.single_word for t in added))

    def _added_pattern(self, escape_special: bool) -> Optional[re.Pattern]:
        names = sorted((t.content for t in self.backend.get_added_tokens_decoder().values()
                        if not (escape_special and t.special)), key=len, reverse=True)
        return re.compile("|".join(map(re.escape, names))) if names else None

    def _pieces(self, text: str, escape_special: bool) -> Iterator[str]:
        pattern, pos = self._added_pattern(escape_special), 0
        for match in (pattern.finditer(text) if pattern is not None else ()):
            yield from self._cut(text, pos, match.start())
            yield match.group()
            pos = match.end()
        yield from self._cut(text, pos, len(text))

    def _cut(self, text: str, start: int, stop: int) -> Iterator[str]:
        pre = self.backend.pre_tokenizer
        while stop - start > 2 * PIECE_CHARS:
            last = None  # the last punctuation-letter pair in the second half of the piece
            for last in PUNCT_LETTER.finditer(text, start + PIECE_CHARS // 2, start + PIECE_CHARS):
                pass
            if last is not None:
                yield text[start:last.start() + 1]
                start = last.start() + 1
                continue
            # Else ask the pre-tokenizer, from this piece's start (a known pre-token start).
            span = PIECE_CHARS
            while True:  # widen until the window holds a safe cut (one pre-token may be huge)
                window = text[start:min(stop, start + span + 1024)]
                cut = max((a for _, (a, _) in pre.pre_tokenize_str(window)
                           if 0 < a <= span and not window[a - 1].isspace()), default=0)
                if cut or start + span >= stop:
                    break
                span *= 2
            if not cut:
                break
            yield text[start:start + cut]
            start += cut
        if stop > start:
            yield text[start:stop]

    def escaping_backend(self):
        if self._escaping is None:
            from tokenizers import Tokenizer as RustTokenizer

            self._escaping = RustTokenizer.from_str(self.backend.to_str())
            self._escaping.encode_special_tokens = True
        return self._escaping

    def decode(self, ids: Sequence[int]) -> str:
        if not isinstance(ids, list):
            ids = list(map(int, ids))
        return self.backend.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    def tokens_by_id(self) -> list[str]:
        vocab = self.backend.get_vocab(with_added_tokens=True)
        return [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / "tokenizer.json"
        if target.resolve() != self.path.resolve():
            shutil.copyfile(self.path, target)  # byte-identical to what was loaded
        return target

    def config(self) -> dict:
        """The parsed tokenizer.json (pipeline description)."""
        return json.loads(self.backend.to_str())


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model`. Special tokens are its control and user-defined pieces."""

    def __init__(self, path: str | Path, name: Optional[str] = None):
        try:
            import sentencepiece
        except ImportError as err:  # an optional dependency (extra "data")
            raise UserError(f"{path}: reading sentencepiece models needs `pip install sentencepiece`") from err
        self.path = Path(path)
        self.name = name or str(self.path)
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as err:
            raise UserError(f"{self.path}: not a tokenizer (sentencepiece cannot read it: "
                            f"{' '.join(str(err).split())})") from None
        self.vocab_size = self.sp.get_piece_size()
        self._special = {self.sp.id_to_piece(i): i for i in _special_piece_ids(self.sp)}

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str], escape_special: bool = False) -> list[list[int]]:
        return self.sp.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(map(int, ids)))

    def tokens_by_id(self) -> list[str]:
        return [self.sp.id_to_piece(i) for i in range(self.vocab_size)]

    def token_to_id(self, token: str) -> Optional[int]:
        tid = self.sp.piece_to_id(token)
        return tid if self.sp.id_to_piece(tid) == token and not self.sp.is_unknown(tid) else None

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def eod_id(self) -> int:
        tid = self.token_to_id(EOD)
        if tid is None and self.sp.eos_id() >= 0:
            return self.sp.eos_id()
        return self.require(EOD, why="documents end with it")

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / "tokenizer.model"
        if target.resolve() != self.path.resolve():
            shutil.copyfile(self.path, target)
        return target


def _special_piece_ids(sp) -> list[int]:
    """Control and user-defined pieces (the latter need the model proto to be told apart)."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb2

        proto = pb2.ModelProto()
        proto.ParseFromString(sp.serialized_model_proto())
        kinds = (pb2.ModelProto.SentencePiece.CONTROL, pb2.ModelProto.SentencePiece.USER_DEFINED)
        return [i for i, piece in enumerate(proto.pieces) if piece.type in kinds]
    except ImportError:  # protobuf missing: control pieces only
        return [i for i in range(sp.get_piece_size()) if sp.is_control(i)]


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """A tokenizer from a tokenizer.json, a sentencepiece `.model`, a folder holding one
    (tokenizer.json preferred), or `builtin:NAME` (`builtin:tiny`)."""
    spec = str(spec)
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        path = ASSETS / name / "tokenizer.json"
        if not path.is_file():
            known = ", ".join(sorted(f"builtin:{p.name}" for p in ASSETS.iterdir() if p.is_dir()))
            raise FileNotFoundError(f"{spec}: no such built-in tokenizer (known: {known})")
        return HFTokenizer(path, name=spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        candidates = [path / "tokenizer.json", path / "tokenizer.model", *sorted(path.glob("*.model"))]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{spec}: folder holds no tokenizer.json or sentencepiece .model")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"{spec}: no such tokenizer file or folder")
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    return HFTokenizer(path)
