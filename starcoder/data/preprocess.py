"""Tokenise a corpus into Megatron `.bin/.idx` files (the engine behind `starcoder preprocess`).

The main process reads and parses records, applies the document format (all random draws are
seeded per document) and writes the output in input order; `workers` processes only tokenise, one
`tokenizers` thread each. So the files are byte-identical for any number of workers.

Fine-tuning formats (starcoder.data.examples) also write `PREFIX_loss_mask.bin/.idx`, a uint8
dataset with the same sizes, 1 where the token carries the loss; PREFIX.json names it.

A run never makes things worse: output is staged and published only when it holds documents;
otherwise a UserError says in one line why nothing was usable. Damaged input files are counted
and named, and a huge line is tokenised in bounded memory (`Tokenizer.encode_long`).
"""

from __future__ import annotations

import collections
import glob
import itertools
import logging
import math
import multiprocessing
import os
import pickle
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import numpy as np

from starcoder.config import UserError
from starcoder.data.corpus import (BadRecord, ByteCounter, Record, iter_records, list_input_files,
                                   parse, snippet, text_field)
from starcoder.data.examples import FINETUNE_FORMATS, Example, ExampleFormatter, example_chars
from starcoder.data.formats import Document, FormatOptions, Formatter
from starcoder.data.indexed import IndexedWriter, process_running, token_dtype
from starcoder.data.tokenizer import PIECE_CHARS, Tokenizer, load_tokenizer

MAX_EXAMPLES = 5  # bad-record examples kept per reason
log = logging.getLogger(__name__)


@dataclass
class PreprocessReport:
    output_prefix: str
    tokenizer: str
    format: str
    # What the loader checks the data against (starcoder.data.binding).
    tokenizer_fingerprint: str = ""
    vocab_size: int = 0
    max_token_id: int = -1
    files: list = field(default_factory=list)
    corrupt_files: dict = field(default_factory=dict)  # path -> reason; read up to the damage
    empty_files: list = field(default_factory=list)
    unusable_files: list = field(default_factory=list)  # "path: why", files that gave no document
    dtype: str = ""
    records: int = 0  # non-blank lines / rows read
    documents: int = 0  # documents written
    tokens: int = 0  # tokens written, EOD included
    empty_documents: int = 0  # skipped: empty content
    bad_records: dict = field(default_factory=dict)  # reason -> count
    bad_examples: list = field(default_factory=list)  # "file:line: reason (detail): snippet"
    special_token_strings: int = 0  # literal special-token strings found in source text
    documents_with_special_strings: int = 0
    escaped_special_tokens: bool = False
    repositories: int = 0  # sc2-repo: repository documents written
    # Fine-tuning formats: the loss-mask dataset beside the tokens (its prefix's file name).
    loss_mask: str = ""
    target_tokens: int = 0  # tokens that carry the loss (responses and closing EOS)
    pairs: int = 0  # preference: chosen/rejected pairs, each one document of two sequences
    chat_template: str = ""  # chat: where the template came from (a file, or "default")
    seconds: float = 0.0

    @property
    def prefix(self) -> str:
        return self.output_prefix

    @property
    def bad(self) -> int:
        return sum(self.bad_records.values())

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        rate = self.tokens / self.seconds if self.seconds else 0.0
        lines = [
            f"wrote {self.output_prefix}.bin/.idx: {self.documents:,} documents, {self.tokens:,} tokens "
            f"({self.dtype}) in {self.seconds:.1f}s ({rate:,.0f} tokens/s)",
            f"read {self.records:,} records from {len(self.files)} file(s); skipped "
            f"{self.empty_documents:,} empty document(s) and {self.bad:,} bad record(s)",
        ]
        for reason, count in sorted(self.bad_records.items()):
            lines.append(f"  {reason}: {count:,}")
        lines += [f"    {e}" for e in self.bad_examples]
        lines += [f"corrupt file {path}: {reason}" for path, reason in self.corrupt_files.items()]
        lines += [f"empty file {path}" for path in self.empty_files]
        lines += [f"warning: {line}" for line in self.unusable_files]
        if self.special_token_strings:
            how = "escaped as plain text" if self.escaped_special_tokens else \
                "encoded as special tokens (use --escape-special-tokens to keep them as text)"
            lines.append(f"{self.special_token_strings:,} literal special-token string(s) in "
                         f"{self.documents_with_special_strings:,} document(s): {how}")
        if self.format == "sc2-repo":
            lines.append(f"{self.repositories:,} repository document(s)")
        if self.loss_mask:
            pairs = f" in {self.pairs:,} chosen/rejected pair(s)" if self.format == "preference" else ""
            lines.append(f"loss mask {self.loss_mask}.bin/.idx: {self.target_tokens:,} of "
                         f"{self.tokens:,} tokens carry the loss{pairs}")
        if self.chat_template:
            lines.append(f"chat template: {self.chat_template}")
        return "\n".join(lines)


def preprocess_corpus(inputs: Union[str, Path, Iterable], tokenizer_spec: str, output_prefix: str,
                      fmt: str = "plain", json_key: str = "content", workers: int = 1, *,
                      repo_key: Optional[str] = None, path_key: Optional[str] = None,
                      stars_key: Optional[str] = None, meta_prob: Optional[float] = None,
                      seed: int = 1234, escape_special_tokens: bool = False,
                      input_grouped: bool = False, group_memory_mb: float = 1024,
                      template: Optional[str] = None, chat_template: Optional[str] = None,
                      commit_markers: str = "tokens", chunk_bytes: int = 1 << 20,
                      progress: Optional[bool] = None) -> PreprocessReport:
    """See `starcoder.data.preprocess_corpus`."""
    _check_format_options(fmt, meta_prob, template, chat_template)
    start = time.perf_counter()
    files = list_input_files(inputs)
    tokenizer = load_tokenizer(tokenizer_spec)
    read = {f.resolve() for f in files} | {Path(tokenizer.path).resolve()}
    for ext in (".bin", ".idx", ".json"):  # e.g. --output-prefix x/tokenizer beside tokenizer.json
        out = Path(f"{output_prefix}{ext}").resolve()
        if out in read:
            raise UserError(f"--output-prefix {output_prefix}: {out} is an input of this run; "
                            "choose another prefix")
    remove_stale_groupings(Path(output_prefix).parent)
    if escape_special_tokens and not hasattr(tokenizer, "escaping_backend"):
        raise UserError(f"--escape-special-tokens: not supported for {tokenizer.name}")
    finetune = fmt in FINETUNE_FORMATS
    if finetune and escape_special_tokens and fmt == "chat":
        raise UserError("--escape-special-tokens: not available with --format chat (the chat "
                        "template's own special tokens would be escaped too)")
    opts = FormatOptions(fmt="plain" if finetune else fmt, json_key=json_key, repo_key=repo_key,
                         path_key=path_key, stars_key=stars_key, meta_prob=meta_prob, seed=seed)
    formatter = Formatter(opts, tokenizer)
    examples = ExampleFormatter(fmt, tokenizer, seed, template, chat_template, commit_markers,
                                0.5 if meta_prob is None else meta_prob) if finetune else None
    eod = tokenizer.eod_id
    dtype = token_dtype(tokenizer.vocab_size)
    report = PreprocessReport(output_prefix=str(output_prefix), tokenizer=tokenizer.name, format=fmt,
                              tokenizer_fingerprint=tokenizer.fingerprint,
                              vocab_size=tokenizer.vocab_size, files=[str(f) for f in files],
                              dtype=dtype.name, escaped_special_tokens=escape_special_tokens)
    counter = ByteCounter()
    reader = _Reader(files, opts, formatter, report, counter, input_grouped,
                     max(4096, int(group_memory_mb * 2**20)), Path(output_prefix).parent, examples)
    bar = _progress(sum(f.stat().st_size for f in files), progress)
    pair = 2 if fmt == "preference" else 1
    writer = IndexedWriter(output_prefix, dtype, pair)
    masks = None
    if finetune:
        report.loss_mask = Path(mask_prefix(output_prefix)).name
        report.chat_template = examples.chat_template_source if fmt == "chat" else ""
        masks = IndexedWriter(mask_prefix(output_prefix), np.uint8, pair)
    try:
        items = reader.examples() if finetune else reader.documents()
        for flat, sizes, n_special, n_docs_special, mask in _tokenize(
                _chunks(items, chunk_bytes, _record_chars if finetune else _document_chars),
                tokenizer, tokenizer_spec, eod, dtype, escape_special_tokens, workers,
                fmt if finetune else None):
            writer.add_documents(flat, sizes)
            if masks is not None:
                masks.add_documents(mask, sizes)
                report.target_tokens += int(mask.sum(dtype=np.int64))
            if flat.size:
                report.max_token_id = max(report.max_token_id, int(flat.max()))
            report.special_token_strings += n_special
            report.documents_with_special_strings += n_docs_special
            if bar is not None:
                bar.update(counter.update() - bar.n)
                elapsed = time.perf_counter() - start
                bar.set_postfix_str(f"{writer.documents / elapsed:,.0f} docs/s, "
                                    f"{writer.tokens / elapsed:,.0f} tokens/s", refresh=False)
        report.documents, report.tokens = writer.documents, writer.tokens
        report.pairs = writer.documents // 2 if pair == 2 else 0
        if bar is not None:
            bar.close()
        if report.documents == 0:  # an earlier dataset at this prefix stays as it was
            raise UserError(reader.why_nothing())
        report.seconds = time.perf_counter() - start
        if masks is not None:  # before the token .idx, which marks the dataset complete
            masks.finish()
        writer.finish(report.to_dict())  # PREFIX.json, the provenance, lands before the .idx
    except BaseException:
        writer.abort()
        if masks is not None:
            masks.abort()
        raise
    return report


def mask_prefix(prefix: str) -> str:
    """Where the loss mask of the fine-tuning dataset at `prefix` lives."""
    return f"{prefix}_loss_mask"


def remove_stale_groupings(folder: Path) -> None:
    """The sc2-repo partitions (`.groupby-PID-*`) of a killed run in the output folder."""
    for path in glob.glob(os.path.join(glob.escape(str(folder)), ".groupby-*-*")):
        pid = os.path.basename(path).split("-")[1]
        if pid.isdigit() and int(pid) != os.getpid() and not process_running(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _progress(total_bytes: int, enabled: Optional[bool]):
    if enabled is False:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess",
                disable=None if enabled is None else not enabled, smoothing=0.1)


# ----------------------------------------------------------------------------------------------
# Reading and formatting (main process)


class _Reader:
    def __init__(self, files, opts: FormatOptions, formatter: Formatter, report: PreprocessReport,
                 counter: ByteCounter, input_grouped: bool, group_budget: int, tmp_parent: Path,
                 examples: Optional[ExampleFormatter] = None):
        self.files, self.opts, self.fmt, self.report = files, opts, formatter, report
        self.example_formatter = examples
        self.counter, self.input_grouped = counter, input_grouped
        self.group_budget, self.tmp_parent = group_budget, tmp_parent
        # The fields of records that lack `json_key`, and which of them hold text: the hint.
        self.missing_content = 0
        self.fields_seen: collections.Counter = collections.Counter()
        self.text_fields: collections.Counter = collections.Counter()

    def bad(self, record: Record, err: BadRecord) -> None:
        r = self.report
        r.bad_records[err.reason] = r.bad_records.get(err.reason, 0) + 1
        if r.bad_records[err.reason] <= MAX_EXAMPLES:
            detail = f" ({err.detail})" if err.detail else ""
            r.bad_examples.append(f"{self.files[record.file]}:{record.line}: {err.reason}{detail}: "
                                  f"{snippet(record)}")

    def corrupt(self, path: Path, reason: str) -> None:
        self.report.corrupt_files[str(path)] = reason
        log.warning("%s: %s; its records up to the damage are kept", path, reason)

    def records(self) -> Iterator[tuple[Record, dict, object]]:
        """(record, parsed object, content) for every usable record; counts the rest. The
        content is the `json_key` text, or with a fine-tuning format the record's examples."""
        key, last_file, usable, missing = self.opts.json_key, -1, 0, 0
        examples = self.example_formatter
        columns = examples.columns() if examples is not None else self.opts.columns()
        for record in iter_records(self.files, columns, self.counter, self.corrupt):
            if record.file != last_file:
                self._note_unusable(last_file, usable, missing)
                self._note_empty(last_file + 1, record.file)
                last_file, usable, missing = record.file, 0, self.missing_content
            self.report.records += 1
            try:
                obj = parse(record)
                # keyed on the record's position in the input: independent of workers
                content = (text_field(obj, key) if examples is None
                           else examples(obj, self.report.records - 1))
            except BadRecord as err:
                if err.reason == "missing key" and err.detail == key:
                    self._missing_content(obj)
                self.bad(record, err)
                continue
            if not content:
                self.report.empty_documents += 1
                continue
            usable += 1
            yield record, obj, content
        self._note_unusable(last_file, usable, missing)
        self._note_empty(last_file + 1, len(self.files))

    def _note_unusable(self, file: int, usable: int, missing_before: int) -> None:
        """A file that had records but none usable (e.g. `{"text": ...}` under the default
        --json-key content) is warned about by name, with the hint, even when others were fine."""
        if file < 0 or usable:
            return
        line = f"{self.files[file]}: no usable record"
        if self.missing_content > missing_before:
            line += f" ({self._missing_hint(self.missing_content - missing_before)})"
        self.report.unusable_files.append(line)
        log.warning("%s", line)

    def _missing_hint(self, count: int) -> str:
        fields = ", ".join(k for k, _ in self.fields_seen.most_common(8))
        hint = f" (use --json-key {self.text_fields.most_common(1)[0][0]})" if self.text_fields else ""
        return (f"{count:,} records have no key '{self.opts.json_key}'" +
                (f"; their keys: {fields}{hint}" if fields else ""))

    def _missing_content(self, obj: dict) -> None:
        self.missing_content += 1
        if self.missing_content <= 10_000:  # enough to name the fields
            self.fields_seen.update(obj.keys())
            self.text_fields.update(k for k, v in obj.items() if isinstance(v, str))

    def _note_empty(self, first: int, stop: int) -> None:
        """Files first..stop-1 gave no record (and were not damaged): warn about each."""
        for path in self.files[first:stop]:
            if str(path) not in self.report.corrupt_files:
                self.report.empty_files.append(str(path))
                log.warning("%s: empty (no records)", path)

    def documents(self) -> Iterator[Document]:
        if self.opts.fmt == "sc2-repo":
            yield from self._repositories()
            return
        for record, obj, content in self.records():
            if self.opts.fmt == "plain":
                yield (content,)
            else:  # keyed on the record's position in the input: independent of workers
                yield self.fmt.sc1_meta(content, obj, self.report.records - 1)

    def examples(self) -> Iterator[list[Example]]:
        """The examples of each usable record (fine-tuning formats)."""
        for _, _, content in self.records():
            yield content

    def why_nothing(self) -> str:
        """One line: why no document was written."""
        r, key, causes = self.report, self.opts.json_key, []
        if self.missing_content:
            causes.append(self._missing_hint(self.missing_content))
        for reason, count in sorted(r.bad_records.items()):
            count -= self.missing_content if reason == "missing key" else 0
            if count:
                causes.append(f"{count:,} records: {reason} (first: {self._example(reason)})")
        if r.empty_documents:
            causes.append(f"{r.empty_documents:,} records have empty '{key}'")
        if r.corrupt_files:
            causes.append(f"{len(r.corrupt_files)} corrupt file(s): " +
                          ", ".join(f"{p}: {why}" for p, why in r.corrupt_files.items()))
        if not r.records and not r.corrupt_files:
            causes.append(f"the input holds no records ({len(r.empty_files)} empty file(s))")
        return "0 documents: " + "; ".join(causes or ["nothing to write"]) + \
            f"; nothing was written to {r.output_prefix}"

    def _example(self, reason: str) -> str:
        return next((e.split(": ", 1)[0] for e in self.report.bad_examples if f": {reason}" in e), "?")

    # sc2-repo: the files of a repository must be brought together.
    def _files(self) -> Iterator[tuple[str, str, str]]:
        for record, obj, content in self.records():
            try:
                repo = text_field(obj, self.opts.repo_key)
                path = text_field(obj, self.opts.path_key) if obj.get(self.opts.path_key) is not None else ""
            except BadRecord as err:
                self.bad(record, err)
                continue
            yield repo, path, content

    def _repositories(self) -> Iterator[Document]:
        if self.input_grouped:
            groups = _contiguous_groups(self._files())
        else:
            groups = _grouped(self._files(), self._partitions(), self.tmp_parent)
        for repo, files in groups:
            self.report.repositories += 1
            yield self.fmt.sc2_repo(repo, files)

    def _partitions(self) -> int:
        """Hash partitions so that one partition's files fit the memory budget."""
        estimate = 0
        for f in self.files:
            name = f.name.lower()
            factor = 4 if name.endswith((".gz", ".zst", ".zstd", ".parquet")) else 1
            estimate += f.stat().st_size * factor
        return max(1, math.ceil(2 * estimate / self.group_budget))


def _contiguous_groups(files) -> Iterator[tuple[str, list]]:
    repo, group = None, []
    for name, path, content in files:
        if name != repo and group:
            yield repo, group
            group = []
        repo = name
        group.append((path, content))
    if group:
        yield repo, group


def _grouped(files, partitions: int, tmp_parent: Path) -> Iterator[tuple[str, list]]:
    """Group files by repository with bounded memory: in memory when one partition suffices,
    otherwise spill to hash partitions on disk and group one partition at a time. Repositories
    come out in order of first appearance (within each partition)."""
    if partitions == 1:
        groups: dict[str, list] = {}
        for repo, path, content in files:
            groups.setdefault(repo, []).append((path, content))
        yield from groups.items()
        return
    from starcoder.data.formats import name_key

    with tempfile.TemporaryDirectory(prefix=f".groupby-{os.getpid()}-", dir=tmp_parent) as tmp:
        paths = [os.path.join(tmp, f"part{i:05d}.pkl") for i in range(partitions)]
        buffers: list[list] = [[] for _ in range(partitions)]
        handles = [open(p, "wb") for p in paths]
        try:
            for item in files:
                p = name_key(item[0]) % partitions
                buffers[p].append(item)
                if len(buffers[p]) >= 256:
                    pickle.dump(buffers[p], handles[p], protocol=pickle.HIGHEST_PROTOCOL)
                    buffers[p] = []
            for p in range(partitions):
                if buffers[p]:
                    pickle.dump(buffers[p], handles[p], protocol=pickle.HIGHEST_PROTOCOL)
        finally:
            for h in handles:
                h.close()
        del buffers
        for path in paths:
            groups = {}
            with open(path, "rb") as f:
                while True:
                    try:
                        batch = pickle.load(f)
                    except EOFError:
                        break
                    for repo, p, content in batch:
                        groups.setdefault(repo, []).append((p, content))
            os.remove(path)
            yield from groups.items()


def _document_chars(doc: Document) -> int:
    return sum(len(p) for p in doc if isinstance(p, str))


def _record_chars(examples: list[Example]) -> int:
    return sum(map(example_chars, examples))


def _chunks(items: Iterator, chunk_bytes: int, chars) -> Iterator[list]:
    """Documents (or records' examples) in chunks of about `chunk_bytes` characters."""
    chunk, size = [], 0
    for doc in items:
        chunk.append(doc)
        size += chars(doc)
        if size >= chunk_bytes or len(chunk) >= 8192:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


# ----------------------------------------------------------------------------------------------
# Tokenising (workers)

_STATE: dict = {}


def _special_pattern(tokenizer: Tokenizer) -> Optional[re.Pattern]:
    names = sorted(tokenizer.special_tokens, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, names))) if names else None


def _init_worker(spec: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one tokenizer thread per worker
    tok = load_tokenizer(spec)
    _STATE.update(tokenizer=tok, pattern=_special_pattern(tok), eod=tok.eod_id,
                  dtype=token_dtype(tok.vocab_size))


def tokenize_documents(docs: list[Document], tokenizer: Tokenizer, pattern, eod: int, dtype,
                       escape: bool) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Tokens of each document (its parts, then EOD) back to back, their sizes, the number of
    literal special-token strings in the text and the number of documents holding any. A text
    longer than two pieces is encoded piece by piece (`Tokenizer.encode_long`), each piece's ids
    kept as a compact array: bounded memory, the same ids."""
    texts = [p for doc in docs for p in doc if isinstance(p, str) and not _long(p)]
    n_special = n_docs = 0
    if pattern is not None:
        for doc in docs:
            found = sum(len(pattern.findall(p)) for p in doc if isinstance(p, str))
            n_special += found
            n_docs += found > 0
    encoded = iter(tokenizer.encode_batch(texts, escape_special=escape))
    pieces, sizes = [], np.empty(len(docs), dtype=np.int32)
    for i, doc in enumerate(docs):
        n = 0
        for ids in _document_ids(doc, encoded, tokenizer, dtype, escape):
            pieces.append(ids)
            n += len(ids)
        pieces.append((eod,))
        sizes[i] = n + 1
    flat = np.fromiter(itertools.chain.from_iterable(pieces), dtype=dtype, count=int(sizes.sum()))
    return flat, sizes, n_special, n_docs


def _document_ids(doc: Document, encoded: Iterator, tokenizer: Tokenizer, dtype, escape: bool):
    """The ids of a document's parts, in pieces: short texts come from `encoded` (their batch
    encoding, in order), long ones piece by piece, special ids as they are."""
    for part in doc:
        if isinstance(part, int):
            yield (part,)
        elif _long(part):
            yield from (np.asarray(ids, dtype=dtype)
                        for ids in tokenizer.encode_long(part, escape_special=escape))
        else:
            yield next(encoded)


def tokenize_examples(records: list[list[Example]], tokenizer: Tokenizer, pattern, eod: int, dtype,
                      escape: bool) -> tuple[np.ndarray, np.ndarray, int, int, np.ndarray]:
    """`tokenize_documents` for fine-tuning records: the tokens of every example back to back,
    its segments tokenised separately (so the mask boundary is exact) and closed by one EOD (added
    unless the text already ends with it), the sizes, the special-string counts (per record) and
    the uint8 loss mask (1 on target segments and the closing EOD)."""
    docs = [doc for examples in records for ex in examples for _, doc in ex]
    texts = [p for doc in docs for p in doc if isinstance(p, str) and not _long(p)]
    n_special = n_docs = 0
    if pattern is not None:
        for examples in records:
            found = sum(len(pattern.findall(p)) for ex in examples for _, doc in ex for p in doc
                        if isinstance(p, str))
            n_special += found
            n_docs += found > 0
    encoded = iter(tokenizer.encode_batch(texts, escape_special=escape))
    pieces, flags, sizes = [], [], []
    for ex in (ex for examples in records for ex in examples):
        n, last = 0, None
        for target, doc in ex:
            for ids in _document_ids(doc, encoded, tokenizer, dtype, escape):
                if len(ids):
                    pieces.append(ids)
                    flags.append((target, len(ids)))
                    n, last = n + len(ids), int(ids[-1])
        if last != eod:
            pieces.append((eod,))
            flags.append((True, 1))
            n += 1
        sizes.append(n)
    sizes = np.asarray(sizes, dtype=np.int32)
    total = int(sizes.sum())
    flat = np.fromiter(itertools.chain.from_iterable(pieces), dtype=dtype, count=total)
    mask = np.repeat(np.array([t for t, _ in flags], dtype=np.uint8),
                     np.array([k for _, k in flags], dtype=np.int64)) if flags else np.zeros(0, np.uint8)
    return flat, sizes, n_special, n_docs, mask


def _long(text: str) -> bool:
    return len(text) > 2 * PIECE_CHARS


def _tokenize_chunk(docs: list, tokenizer: Tokenizer, pattern, eod: int, dtype, escape: bool,
                    finetune: Optional[str]):
    """(tokens, sizes, special strings, documents with them, loss mask or None) of one chunk;
    `finetune` is the fine-tuning format, if any."""
    if finetune:
        # A rendered chat holds the template's own special tokens: not literal strings of the text.
        return tokenize_examples(docs, tokenizer, None if finetune == "chat" else pattern, eod,
                                 dtype, escape)
    return (*tokenize_documents(docs, tokenizer, pattern, eod, dtype, escape), None)


def _work(docs: list, escape: bool, finetune: Optional[str]):
    s = _STATE
    return _tokenize_chunk(docs, s["tokenizer"], s["pattern"], s["eod"], s["dtype"], escape, finetune)


def _tokenize(chunks: Iterator[list], tokenizer: Tokenizer, spec: str, eod: int, dtype,
              escape: bool, workers: int, finetune: Optional[str] = None):
    """Tokenised chunks in input order; at most 2 chunks per worker in flight (bounded memory)."""
    if workers <= 1:
        saved = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            pattern = _special_pattern(tokenizer)
            for docs in chunks:
                yield _tokenize_chunk(docs, tokenizer, pattern, eod, dtype, escape, finetune)
        finally:
            if saved is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = saved
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(spec,)) as pool:
        pending: collections.deque = collections.deque()
        for docs in chunks:
            pending.append(pool.apply_async(_work, (docs, escape, finetune)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# The formats each option means something for: given with another, it would be silently ignored.
_OPTION_FORMATS = {"--meta-prob": ("sc1-meta", "sc2-repo", "commit"),
                   "--template": ("instruct", "preference"), "--chat-template": ("chat",)}


def _check_format_options(fmt: str, meta_prob, template, chat_template) -> None:
    given = {"--meta-prob": meta_prob, "--template": template, "--chat-template": chat_template}
    for option, value in given.items():
        if value is not None and fmt not in _OPTION_FORMATS[option]:
            raise UserError(f"{option}: not used by --format {fmt} (only by "
                            f"{', '.join(_OPTION_FORMATS[option])})")
