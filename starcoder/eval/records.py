"""Append-only JSONL files that survive interruption: a resumed eval reads what is there and
adds the rest. A line cut short by a crash is dropped (and rewritten) on the next open."""

from __future__ import annotations

import json
import os
from pathlib import Path

from starcoder.config import UserError


class JsonlLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: list[dict] = []
        if self.path.is_file():
            data = self.path.read_bytes()
            complete = data[: data.rfind(b"\n") + 1]
            if len(complete) != len(data):  # an interrupted write: keep the whole lines only
                with open(self.path, "r+b") as f:
                    f.truncate(len(complete))
            for n, line in enumerate(complete.decode().splitlines(), 1):
                try:
                    self.records.append(json.loads(line))
                except json.JSONDecodeError:
                    raise UserError(f"{self.path}:{n}: not a JSON line; remove the file or use "
                                    f"another --output") from None

    def keys(self) -> set[tuple[str, int]]:
        return {(r["task_id"], r["sample"]) for r in self.records}

    def append(self, records: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.extend(records)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def check_settings(folder: Path, settings: dict) -> None:
    """A resumed eval must be the same eval: compare with the settings saved on the first run."""
    path = folder / "settings.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        if changed:
            diff = ", ".join(f"{k}: {saved.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise UserError(f"{folder}: holds an eval with other settings ({diff}); resume it "
                            f"with the same options or use another --output")
        return
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, settings)
