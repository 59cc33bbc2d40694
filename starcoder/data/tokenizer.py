"""One tokenizer interface over Hugging Face `tokenizers` (tokenizer.json) and sentencepiece.

`load_tokenizer(spec)` takes a tokenizer.json, a sentencepiece `.model`, a folder holding one,
or `builtin:tiny` (the tiny presets' tokenizer shipped in `starcoder/assets/tokenizers/tiny`).
Special tokens are looked up by name; FIM sentinels also under SantaCoder's hyphenated names.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "tokenizers"
EOD = "<|endoftext|>"
# name -> spellings tried in order: StarCoder/StarCoder2 first, then SantaCoder's hyphenated one.
FIM_TOKENS = {
    "prefix": ("<fim_prefix>", "<fim-prefix>"),
    "middle": ("<fim_middle>", "<fim-middle>"),
    "suffix": ("<fim_suffix>", "<fim-suffix>"),
    "pad": ("<fim_pad>", "<fim-pad>"),
}


class MissingTokenError(ValueError):
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
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str], escape_special: bool = False) -> list[list[int]]:
        """Encode many texts; with `escape_special`, literal special-token strings are encoded as
        ordinary text (where the tokenizer supports it)."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

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
        self.backend = RustTokenizer.from_file(str(self.path))
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
            raise ImportError(f"{path}: reading sentencepiece models needs `pip install sentencepiece`") from err
        self.path = Path(path)
        self.name = name or str(self.path)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = self.sp.get_piece_size()
        self._special = {self.sp.id_to_piece(i): i for i in _special_piece_ids(self.sp)}

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str], escape_special: bool = False) -> list[list[int]]:
        return self.sp.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(map(int, ids)))

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
