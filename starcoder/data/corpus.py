"""Reading corpora shaped like The Stack: JSON lines (plain, `.gz`, `.zst`) and Parquet, or folders
of them. Records come out in a fixed order (files sorted by path), each tagged with its file and
line, so every later random draw can be keyed on a record's position."""

from __future__ import annotations

import gzip
import io
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

from starcoder.config import UserError

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSED = (".gz", ".zst", ".zstd")


def is_input_file(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return True
    for comp in ("", *COMPRESSED):
        if any(name.endswith(s + comp) for s in JSON_SUFFIXES):
            return True
    return False


def list_input_files(inputs: Union[str, Path, Iterable[Union[str, Path]]]) -> list[Path]:
    """Expand files and folders (recursively, sorted) into the list of input files."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_input_file(p))
            if not found:
                raise FileNotFoundError(f"{path}: folder holds no .jsonl/.json(.gz/.zst) or .parquet files")
            files.extend(found)
        elif path.is_file():
            if not is_input_file(path):
                raise UserError(f"{path}: unsupported input (expected .jsonl, .json, .ndjson, "
                                 "optionally .gz/.zst, or .parquet)")
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such input file or folder")
    if not files:
        raise UserError("no input files given")
    return files


@dataclass
class Record:
    file: int  # index into the input file list
    line: int  # 1-based line (JSON lines) or row (Parquet)
    raw: Optional[bytes] = None  # a JSON line, parsed by `parse`
    row: Optional[dict] = None  # a Parquet row


class ByteCounter:
    """Tracks how many bytes of the input files have been consumed (for the progress bar)."""

    def __init__(self):
        self.done = 0
        self._file = None
        self._base = 0

    def track(self, fileobj) -> None:
        self._file, self._base = fileobj, self.done

    def update(self) -> int:
        if self._file is not None and not self._file.closed:
            self.done = self._base + self._file.tell()
        return self.done


def _open_lines(path: Path, raw_file) -> io.BufferedIOBase:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw_file, mode="rb")
    if name.endswith((".zst", ".zstd")):
        try:
            import zstandard
        except ImportError as err:
            raise UserError(f"{path}: reading .zst needs `pip install zstandard`") from err
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw_file), 1 << 20)
    return raw_file


def corrupt_file_errors() -> tuple[type, ...]:
    """What a damaged .gz, .zst or Parquet file raises while it is read."""
    errors: list[type] = [OSError, EOFError, zlib.error]  # gzip.BadGzipFile is an OSError
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    try:
        import pyarrow

        errors.append(pyarrow.ArrowException)
    except ImportError:
        pass
    return tuple(errors)


def iter_records(files: list[Path], columns: list[str], counter: Optional[ByteCounter] = None,
                 on_corrupt: Optional[Callable[[Path, str], None]] = None) -> Iterator[Record]:
    """Every record of every file in order. Parquet reads only `columns` that exist. A file that
    turns out damaged ends where the damage starts: `on_corrupt(path, reason)` is told and the
    next file is read (without `on_corrupt`, a UserError naming the file)."""
    counter = counter or ByteCounter()
    corrupt = corrupt_file_errors()
    for fi, path in enumerate(files):
        try:
            if path.name.lower().endswith(".parquet"):
                yield from _parquet_records(fi, path, columns, counter)
                continue
            with open(path, "rb", buffering=1 << 20) as raw_file:
                counter.track(raw_file)
                stream = _open_lines(path, raw_file)
                for line_no, line in enumerate(stream, 1):
                    if line.strip():
                        yield Record(fi, line_no, raw=line)
        except (FileNotFoundError, PermissionError):
            raise
        except corrupt as err:
            reason = f"corrupt ({' '.join(str(err).split()) or type(err).__name__})"
            if on_corrupt is None:
                raise UserError(f"{path}: {reason}") from None
            on_corrupt(path, reason)
        counter.update()


def _parquet_records(fi: int, path: Path, columns: list[str], counter: ByteCounter) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise UserError(f"{path}: reading Parquet needs `pip install pyarrow`") from err
    with open(path, "rb") as raw_file:
        counter.track(raw_file)
        pf = pq.ParquetFile(raw_file)
        present = [c for c in columns if c in pf.schema_arrow.names]
        row = 0
        for rg in range(pf.num_row_groups):
            table = pf.read_row_group(rg, columns=present)
            for item in table.to_pylist():
                row += 1
                yield Record(fi, row, row=item)
            counter.update()


class BadRecord(Exception):
    """A record that cannot be used; `reason` is one of the reported categories."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def parse(record: Record) -> dict:
    """The record as a dict; raises BadRecord for invalid UTF-8 or JSON."""
    if record.row is not None:
        return record.row
    try:
        obj = json.loads(record.raw)
    except UnicodeDecodeError as err:
        raise BadRecord("invalid UTF-8", str(err)) from None
    except json.JSONDecodeError as err:
        raise BadRecord("invalid JSON", str(err)) from None
    if not isinstance(obj, dict):
        raise BadRecord("not a JSON object", type(obj).__name__)
    return obj


def text_field(obj: dict, key: str) -> str:
    """obj[key] as valid Unicode text; raises BadRecord otherwise."""
    value = obj.get(key)
    if value is None:
        raise BadRecord("missing key", key)
    if not isinstance(value, str):
        raise BadRecord("missing key", f"{key} is a {type(value).__name__}, not a string")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate from a \ud800 escape
            raise BadRecord("invalid UTF-8", str(err)) from None
    return value


def snippet(record: Record, width: int = 80) -> str:
    data = record.raw if record.raw is not None else repr(record.row).encode()
    text = data[:width].decode("utf-8", "replace").rstrip("\r\n")
    return text + ("..." if len(data) > width else "")
