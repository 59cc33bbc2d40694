"""The datatrove pipeline steps of `starcoder curate`. Each counting step writes, per task,
`report/<stage>/<task>.json` (documents and bytes in and out, reasons, examples), which the
report step merges. Steps hold only configuration, so datatrove can pickle them for Slurm."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from starcoder.curation.config import CurateConfig

SIZE_BINS = np.linspace(0, 7, 71)  # log10 characters
LINE_BINS = np.linspace(0, 200, 81)  # mean line length
PART_BYTES = 64 << 20  # text per Parquet file
ID_COLUMN = "__curate_id"  # the document id, in intermediate files only


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


class CountedStep(PipelineStep):
    stage = ""

    def __init__(self, work: str, cfg: CurateConfig):
        super().__init__()
        self.work, self.cfg = str(work), cfg

    def _begin(self) -> dict:
        return {"docs_in": 0, "bytes_in": 0, "docs_out": 0, "bytes_out": 0,
                "reasons": Counter(), "examples": []}

    def _count_in(self, s: dict, doc: Document) -> None:
        s["docs_in"] += 1
        s["bytes_in"] += _nbytes(doc.text)

    def _count_out(self, s: dict, doc: Document) -> None:
        s["docs_out"] += 1
        s["bytes_out"] += _nbytes(doc.text)

    def _example(self, s: dict, **fields) -> None:
        if len(s["examples"]) < self.cfg.run.examples:
            s["examples"].append(fields)

    def _save(self, s: dict, rank: int, stage: Optional[str] = None) -> None:
        out = Path(self.work) / "report" / (stage or self.stage) / f"{rank:05d}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(s))
        tmp.replace(out)


class ReadCorpus(CountedStep):
    """The Stack's JSON lines / Parquet layouts, read by the same code as `starcoder preprocess`;
    task r reads files r, r + tasks, ... Bad records are counted, never fatal."""

    name = "📖 read corpus"
    stage = "read"

    def __init__(self, work: str, cfg: CurateConfig, inputs: list[str]):
        super().__init__(work, cfg)
        self.inputs = list(inputs)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from starcoder.data.corpus import BadRecord, iter_records, list_input_files, parse, text_field
        files = list_input_files(self.inputs)
        key = self.cfg.input.content_key
        s = self._begin()
        mine = list(range(rank, len(files), world_size))
        for record in iter_records([files[i] for i in mine], [], None):
            try:
                obj = dict(parse(record))
                text = text_field(obj, key)
            except BadRecord as err:
                s["reasons"][err.reason] += 1
                self._example(s, id=f"{files[mine[record.file]]}:{record.line}", reason=err.reason)
                continue
            if not text:
                s["reasons"]["empty content"] += 1
                continue
            obj.pop(key)
            doc = Document(text=text, id=str(obj.get("id") or obj.get("blob_id")
                                              or f"{files[mine[record.file]].name}:{record.line}"),
                           metadata=obj)
            self._count_out(s, doc)
            yield doc
        self._save(s, rank)


class Measure(CountedStep):
    """Size and mean-line-length histograms (the report's before/after plot)."""

    name = "📏 measure"

    def __init__(self, work: str, cfg: CurateConfig, stage: str):
        super().__init__(work, cfg)
        self.stage = stage

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        s = self._begin()
        sizes, lines = [], []
        for doc in data:
            self._count_in(s, doc)
            self._count_out(s, doc)
            sizes.append(len(doc.text))
            lines.append(len(doc.text) / (doc.text.count("\n") + 1))
            yield doc
        s["size_hist"] = np.histogram(np.log10(np.maximum(sizes, 1)), SIZE_BINS)[0].tolist()
        s["line_hist"] = np.histogram(np.minimum(lines, 199.9), LINE_BINS)[0].tolist()
        self._save(s, rank)


class DropStep(CountedStep):
    """Drops documents for which `reason(doc)` returns a reason."""

    def _setup(self) -> None:
        pass

    def reason(self, doc: Document) -> Optional[str]:
        raise NotImplementedError

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self._setup()
        s = self._begin()
        for doc in data:
            self._count_in(s, doc)
            why = self.reason(doc)
            if why:
                s["reasons"][why] += 1
                self._example(s, id=doc.id, reason=why, text=doc.text[:200])
                continue
            self._count_out(s, doc)
            yield doc
        self._save(s, rank)


class Select(DropStep):
    name = "🚪 opt-out and licences"
    stage = "select"

    def _setup(self) -> None:
        from starcoder.curation.filters import read_opt_out
        self._opt_out = read_opt_out(self.cfg.select.opt_out)

    def reason(self, doc: Document) -> Optional[str]:
        from starcoder.curation.filters import select_reason
        return select_reason(doc.metadata, self.cfg.select, self._opt_out)


class QualityFilters(DropStep):
    name = "🧹 SantaCoder/StarCoder filters"
    stage = "filters"

    def _setup(self) -> None:
        from starcoder.curation.filters import read_extension_thresholds
        self._per_ext = read_extension_thresholds(self.cfg.filters.per_extension_csv, self.cfg.filters)

    def reason(self, doc: Document) -> Optional[str]:
        from starcoder.curation.filters import quality_reason
        return quality_reason(doc.text, doc.metadata, self.cfg.filters, self._per_ext)


class Decontaminate(DropStep):
    name = "🧪 decontamination"
    stage = "decontamination"

    def _setup(self) -> None:
        from starcoder.curation.decontaminate import Decontaminator, benchmark_needles, humaneval_needles
        d = self.cfg.decontamination
        needles = humaneval_needles() if d.humaneval else []
        for path in d.benchmarks:
            needles += benchmark_needles(path, d.benchmark_keys)
        self._matcher = Decontaminator(needles, d.min_length)

    def reason(self, doc: Document) -> Optional[str]:
        found = self._matcher.match(doc.text)
        return f"contains {found.split(':')[0]}" if found else None


class WriteParquet(PipelineStep):
    """Writes the records back in their own columns (text as `content_key`, 0 stars kept),
    `{task:05d}_{part:03d}.parquet`, each file renamed into place when complete."""

    name = "💾 write parquet"

    def __init__(self, folder: str, content_key: str, keep_id: bool = False):
        super().__init__()
        self.folder, self.content_key, self.keep_id = str(folder), content_key, keep_id

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        import pyarrow as pa
        import pyarrow.parquet as pq
        folder = Path(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob(f"{rank:05d}_*.parquet"):
            old.unlink()  # a rerun of this task replaces its files
        rows, size, part = [], 0, 0

        def flush():
            nonlocal rows, size, part
            path = folder / f"{rank:05d}_{part:03d}.parquet"
            pq.write_table(pa.Table.from_pylist(rows), str(path) + ".tmp")
            Path(str(path) + ".tmp").replace(path)
            rows, size, part = [], 0, part + 1

        for doc in data:
            rows.append({**doc.metadata, self.content_key: doc.text,
                         **({ID_COLUMN: doc.id} if self.keep_id else {})})
            size += len(doc.text)
            if size >= PART_BYTES:
                flush()
            yield doc
        if rows:
            flush()


class ReadTask(PipelineStep):
    """Task r reads back exactly what task r of the first stage wrote, in order, so a document's
    index matches its signature and its key."""

    name = "📖 read task"

    def __init__(self, folder: str, content_key: str):
        super().__init__()
        self.folder, self.content_key = str(folder), content_key

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        import pyarrow.parquet as pq
        for path in sorted(Path(self.folder).glob(f"{rank:05d}_*.parquet")):
            for row in pq.read_table(path).to_pylist():
                text, doc_id = row.pop(self.content_key), row.pop(ID_COLUMN)
                yield Document(text=text, id=doc_id, metadata=row)


class DropDuplicates(CountedStep):
    """Drops what the cluster step chose, reported as two stages (exact, near)."""

    name = "✂️ drop duplicates"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        path = Path(self.work) / "removals" / f"{rank:05d}.json"
        removals = {int(k): v for k, v in json.loads(path.read_text()).items()} if path.exists() else {}
        exact, near = self._begin(), self._begin()
        for idx, doc in enumerate(data):
            stage, kept = removals.get(idx, (None, None))
            self._count_in(exact, doc)
            if stage == "exact_dedup":
                exact["reasons"]["duplicate"] += 1
                self._example(exact, id=doc.id, kept=kept)
                continue
            self._count_out(exact, doc)
            self._count_in(near, doc)
            if stage == "near_dedup":
                near["reasons"]["duplicate"] += 1
                self._example(near, id=doc.id, kept=kept)
                continue
            self._count_out(near, doc)
            yield doc
        for name, s in (("exact_dedup", exact), ("near_dedup", near)):
            if getattr(self.cfg, name).enabled:
                self._save(s, rank, name)


class RedactPII(CountedStep):
    name = "🕵️ PII redaction"
    stage = "pii"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from starcoder.curation.pii import Redactor
        redactor = Redactor(self.cfg.pii)
        s = self._begin()
        s["redacted_docs"] = 0
        for doc in data:
            self._count_in(s, doc)
            text, findings = redactor.redact(doc.text, doc.id)
            if findings:
                s["redacted_docs"] += 1
                for f in findings:
                    s["reasons"][f.kind] += 1
                first = findings[0]
                self._example(s, id=doc.id, kind=first.kind, detail=first.detail,
                              context=text[max(0, first.start - 40):first.start + 60])
                doc.text = text
            self._count_out(s, doc)
            yield doc
        self._save(s, rank)
