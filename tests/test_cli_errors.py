"""Ordinary user mistakes, one or more per subcommand: each ends with exit code 2 and one line
`error: ...` naming the file or key on stderr, never a traceback; `--debug` / STARCODER_DEBUG=1
show the traceback."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from starcoder.cli import main
from starcoder.data.indexed import HEADER
from tests.data.conftest import small_tokenizer, write_jsonl
from tests.training.helpers import TINY, make_corpus


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mistakes")
    corpus = make_corpus(root / "corpus", files=4)
    f = {"root": root, "corpus": Path(corpus), "small": small_tokenizer(root / "small-tokenizer.json")}
    (root / "not-yaml.yaml").write_text("model:\n  hidden_size: [64\n")
    (root / "latin1.yaml").write_bytes("# caf\xe9\nmodel: {}\n".encode("latin-1"))
    (root / "not-a-tokenizer.json").write_text('{"hello": "world"}\n')
    (root / "garbage-tokenizer.json").write_text("garbage\n")
    (root / "junk.model").write_text("not sentencepiece\n")
    (root / "notes.txt").write_text("x\n")
    write_jsonl(root / "text.jsonl", [{"text": f"x = {i}\n", "id": i} for i in range(60)])
    (root / "empty.jsonl").write_bytes(b"")
    (root / "corrupt.jsonl.gz").write_bytes(b"this is not gzip data\n" * 4)
    f["uint8"] = _copy_corpus(corpus, root / "uint8")
    with open(f"{f['uint8']}.idx", "r+b") as idx:
        idx.seek(17)
        idx.write(bytes([1]))  # megatron-core's code for uint8
    f["garbage"] = _copy_corpus(corpus, root / "garbage")
    size = Path(f"{f['garbage']}.idx").stat().st_size
    with open(f"{f['garbage']}.idx", "r+b") as idx:
        idx.seek(HEADER)
        idx.write(np.random.default_rng(0).integers(0, 256, size - HEADER, dtype=np.uint8).tobytes())
    return f


def _copy_corpus(prefix: str, target: Path) -> str:
    target.mkdir()
    for ext in (".bin", ".idx", ".json"):
        shutil.copy(prefix + ext, target / ("corpus" + ext))
    return str(target / "corpus")


def train_args(f, *overrides: str) -> list[str]:
    args = ["train", "--config", "tiny-sc2"]
    for item in [*TINY, f"data.paths=[{f['corpus']}]", f"train.output_dir={f['root'] / 'run'}",
                 "train.max_steps=1", *overrides]:
        args += ["--set", item]
    return args


# (subcommand arguments, a fragment the one line must hold); `{name}` is a path from `files`.
MISTAKES = {
    "train: a config file that is not YAML":
        (["train", "--config", "{root}/not-yaml.yaml"], "not-yaml.yaml: not valid YAML"),
    "train: a config file that is not UTF-8":
        (["train", "--config", "{root}/latin1.yaml"], "latin1.yaml: not UTF-8 text"),
    "train: a malformed --set value":
        (["TRAIN", "model.hidden_size=[64"], "--set model.hidden_size=[64: the value is not valid YAML"),
    "train: a tokenizer file that is not a tokenizer":
        (["TRAIN", "data.tokenizer={root}/not-a-tokenizer.json"], "not-a-tokenizer.json: not a tokenizer"),
    "train: a uint8 .idx":
        (["TRAIN", "data.paths=[{uint8}]"], "corpus.idx: dtype uint8 is not supported (token files"),
    "train: a garbage .idx body":
        (["TRAIN", "data.paths=[{garbage}]"], "corpus.idx: corrupt index"),
    "train: data made with another tokenizer (FIM on, as in the preset)":
        (["TRAIN", "data.tokenizer={small}"], "corpus was tokenised with builtin:tiny (vocabulary 8192"),
    "train: a data prefix that does not exist":
        (["TRAIN", "data.paths=[{root}/nowhere]"], "data.paths: {root}/nowhere.idx: no such index file"),
    "train: a config that does not exist":
        (["train", "--config", "{root}/nowhere.yaml"], "nowhere.yaml: no such file or preset"),
    "train: an inf blend weight":
        (["TRAIN", "data.paths=[{{path: {corpus}, weight: .inf}}]"],
         "data.paths[0].weight: must be a positive finite number, got inf"),
    "preprocess: a tokenizer file that is not a tokenizer":
        (["preprocess", "--input", "{root}/text.jsonl", "--tokenizer", "{root}/garbage-tokenizer.json",
          "--output-prefix", "{root}/out/a"], "garbage-tokenizer.json: not a tokenizer"),
    "preprocess: a .model file that is not sentencepiece":
        (["preprocess", "--input", "{root}/text.jsonl", "--tokenizer", "{root}/junk.model",
          "--output-prefix", "{root}/out/e"], "junk.model: not a tokenizer"),
    "preprocess: an input that is not JSON lines or Parquet":
        (["preprocess", "--input", "{root}/notes.txt", "--tokenizer", "builtin:tiny",
          "--output-prefix", "{root}/out/f"], "notes.txt: unsupported input"),
    "preprocess: a format whose tokens the tokenizer lacks":
        (["preprocess", "--input", "{root}/text.jsonl", "--tokenizer", "{small}", "--format", "sc1-meta",
          "--json-key", "text", "--output-prefix", "{root}/out/g"], "has no <reponame> token"),
    "preprocess: an output prefix under a file":
        (["preprocess", "--input", "{root}/text.jsonl", "--tokenizer", "builtin:tiny", "--json-key", "text",
          "--output-prefix", "{root}/notes.txt/d"], "notes.txt"),
    "preprocess: --workers 0":
        (["preprocess", "--input", "{root}/text.jsonl", "--tokenizer", "builtin:tiny", "--workers", "0",
          "--output-prefix", "{root}/out/h"], "--workers: must be at least 1, got 0"),
    "preprocess: every record lacks the key":
        (["preprocess", "--input", "{root}/text.jsonl", "--tokenizer", "builtin:tiny",
          "--output-prefix", "{root}/out/b"],
         "0 documents: 60 records have no key 'content'; their keys: text, id (use --json-key text)"),
    "preprocess: an empty input":
        (["preprocess", "--input", "{root}/empty.jsonl", "--tokenizer", "builtin:tiny",
          "--output-prefix", "{root}/out/c"], "0 documents: the input holds no records"),
    "preprocess: a corrupt .gz":
        (["preprocess", "--input", "{root}/corrupt.jsonl.gz", "--tokenizer", "builtin:tiny",
          "--output-prefix", "{root}/out/d"], "corrupt.jsonl.gz: corrupt"),
    "info: a config file that is not UTF-8":
        (["info", "--config", "{root}/latin1.yaml"], "latin1.yaml: not UTF-8 text"),
    "info: a malformed --set value":
        (["info", "--config", "tiny-sc2", "--set", "model.rope_theta={{1e4"],
         "--set model.rope_theta={{1e4: the value is not valid YAML"),
    "convert: a checkpoint folder that does not exist":
        (["convert", "to-hf", "--checkpoint", "{root}/missing", "--output", "{root}/hf"], "missing"),
    "demo: a bad --set (reported before the corpus is tokenised)":
        (["demo", "--output-dir", "{root}/demo", "--set", "model.hidden_sise=64"],
         "model.hidden_sise: unknown key (did you mean hidden_size?)"),
}


def expand(f, args: list[str]) -> list[str]:
    if args[0] == "TRAIN":
        args = train_args(f, *args[1:])
    return [a.format(**{k: str(v) for k, v in f.items()}) for a in args]


@pytest.mark.parametrize("case", list(MISTAKES))
def test_a_mistake_is_one_line_and_exit_code_2(case, files, capsys, monkeypatch):
    monkeypatch.delenv("STARCODER_DEBUG", raising=False)
    args, fragment = MISTAKES[case]
    code = main(expand(files, args))  # an uncaught exception would be the traceback
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err and err[-1].startswith("error: "), err
    assert fragment.format(**{k: str(v) for k, v in files.items()}) in err[-1], err[-1]
    assert not any("Traceback" in line for line in err)
    assert [line for line in err if line.startswith("error:")] == [err[-1]]
    args = expand(files, args)
    if "--output-prefix" in args:  # nothing written, not even an empty dataset
        prefix = Path(args[args.index("--output-prefix") + 1])
        assert not prefix.parent.exists() or not list(prefix.parent.glob(prefix.name + "*"))
    assert not (files["root"] / "demo" / "data").exists()  # the demo stops before tokenising


def test_a_real_process_prints_one_line_and_debug_shows_the_traceback(files):
    args = [sys.executable, "-m", "starcoder", "info", "--config", str(files["root"] / "not-yaml.yaml")]
    res = subprocess.run(args, capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr
    debug = subprocess.run(args[:3] + ["--debug"] + args[3:], capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "not valid YAML" in debug.stderr


def test_starcoder_debug_raises(files, monkeypatch):
    from starcoder.config import UserError

    monkeypatch.setenv("STARCODER_DEBUG", "1")
    with pytest.raises(UserError, match="not UTF-8"):
        main(["info", "--config", str(files["root"] / "latin1.yaml")])


def test_a_gzip_that_breaks_midway_keeps_its_good_records(tmp_path):
    good = gzip.compress(b"".join(json.dumps({"content": f"x = {i}\n"}).encode() + b"\n"
                                  for i in range(50)))
    (tmp_path / "cut.jsonl.gz").write_bytes(good[:len(good) // 2])
    write_jsonl(tmp_path / "fine.jsonl", [{"content": "y = 2\n"}])
    from starcoder.data import preprocess_corpus

    report = preprocess_corpus([tmp_path / "cut.jsonl.gz", tmp_path / "fine.jsonl"], "builtin:tiny",
                               str(tmp_path / "out"), progress=False)
    assert list(report.corrupt_files) == [str(tmp_path / "cut.jsonl.gz")]
    assert 1 <= report.documents < 51
    assert "cut.jsonl.gz" in report.summary()
