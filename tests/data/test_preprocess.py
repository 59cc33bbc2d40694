"""`starcoder preprocess`: exact tokens, bad input accounting, formats, worker independence."""

import gzip
import json
import re
from pathlib import Path

import pytest

from megatron.core.datasets.indexed_dataset import IndexedDataset
from starcoder.cli import main
from starcoder.data import preprocess_corpus
from starcoder.data.indexed import IndexedTokens
from starcoder.data.tokenizer import load_tokenizer
from tests.data.conftest import TRICKY, write_jsonl

BAD_LINES = [
    b'{"content": "unterminated',  # invalid JSON
    b'{"text": "no content key"}',  # missing key
    b'{"content": 42}',  # not a string
    b'{"content": "bad \xff\xfe bytes"}',  # invalid UTF-8
    b'{"content": "lone \\ud800 surrogate"}',  # invalid Unicode
    b'[1, 2, 3]',  # not an object
]


def _corpus(code) -> list[str]:
    long_line = "x = [" + ", ".join(str(i) for i in range(20000)) + "]\n"  # one very long line
    return [*TRICKY, code[0].replace("\n", "\r\n"), long_line, code[1], "", code[2], "\u00e9" * 3000]


def _docs(prefix) -> list[list[int]]:
    data = IndexedTokens(prefix)
    return [data[i].tolist() for i in range(len(data))]


def test_tokens_equal_encode_plus_eod_with_the_real_tokenizer(tmp_path, sc2_path, sc2, code):
    texts = _corpus(code)
    src = write_jsonl(tmp_path / "in.jsonl", [{"content": t} for t in texts[:5]], BAD_LINES)
    with gzip.open(tmp_path / "more.jsonl.gz", "wb") as f:  # a folder of files, read in order
        f.write(b"".join(json.dumps({"content": t}).encode() + b"\n" for t in texts[5:]))
    folder = tmp_path / "corpus"
    folder.mkdir()
    src.rename(folder / "a.jsonl")
    (tmp_path / "more.jsonl.gz").rename(folder / "b.jsonl.gz")
    report = preprocess_corpus(folder, str(sc2_path), str(tmp_path / "out"), progress=False)
    expected = [sc2.encode(t) + [0] for t in texts if t]
    assert _docs(tmp_path / "out") == expected
    assert report.documents == len(expected) and report.empty_documents == 1
    assert report.tokens == sum(map(len, expected))
    assert report.bad_records == {"invalid JSON": 1, "missing key": 2, "invalid UTF-8": 2,
                                  "not a JSON object": 1}
    assert any("a.jsonl:7: missing key (content)" in e for e in report.bad_examples)
    assert report.special_token_strings == 2 and report.documents_with_special_strings == 1
    # megatron-core reads the same tokens
    theirs = IndexedDataset(str(tmp_path / "out"))
    assert [theirs[i].tolist() for i in range(len(theirs))] == expected
    assert json.loads((tmp_path / "out.json").read_text())["documents"] == len(expected)


def test_zstd_and_parquet_inputs(tmp_path, tiny, code):
    zstandard = pytest.importorskip("zstandard")
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    texts = code[:6]
    data = b"".join(json.dumps({"content": t}).encode() + b"\n" for t in texts)
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    pq.write_table(pa.table({"content": texts, "other": list(range(6))}), tmp_path / "b.parquet",
                   row_group_size=4)
    preprocess_corpus([tmp_path / "a.jsonl.zst", tmp_path / "b.parquet"], "builtin:tiny",
                      str(tmp_path / "out"), progress=False)
    assert _docs(tmp_path / "out") == [tiny.encode(t) + [0] for t in texts + texts]


def test_special_token_strings_are_counted_and_can_be_escaped(tmp_path, tiny):
    text = "print('<|endoftext|>')  # and <file_sep> too\n"
    write_jsonl(tmp_path / "in.jsonl", [{"content": text}])
    plain = preprocess_corpus(tmp_path / "in.jsonl", "builtin:tiny", str(tmp_path / "plain"), progress=False)
    escaped = preprocess_corpus(tmp_path / "in.jsonl", "builtin:tiny", str(tmp_path / "esc"),
                                escape_special_tokens=True, progress=False)
    assert plain.special_token_strings == escaped.special_token_strings == 2
    (p,), (e,) = _docs(tmp_path / "plain"), _docs(tmp_path / "esc")
    assert p == tiny.encode(text) + [0] and p.count(0) == 2 and 6 in p  # default: special ids
    assert e.count(0) == 1 and 6 not in e and tiny.decode(e[:-1]) == text  # escaped: plain text
    assert "--escape-special-tokens" in plain.summary()


def _sc1_tokenizer(tmp_path: Path, tiny) -> str:
    """The tiny tokenizer plus StarCoder's metadata tokens (as added special tokens)."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(tiny.path))
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<reponame>", "<filename>", "<gh_stars>")])
    path = tmp_path / "sc1-tiny.json"
    tok.save(str(path))
    return str(path)


def _meta_rows(code, count: int) -> list[dict]:
    rows = []
    for i in range(count):
        rows.append({"content": code[i % len(code)][:200 + i], "max_stars_repo_name": f"owner/repo{i % 7}",
                     "max_stars_repo_path": f"src/m{i}.py", "max_stars_count": [None, 0, 5, 50, 500, 5000][i % 6],
                     "repo_name": f"owner/repo{i % 7}", "path": f"src/m{i}.py"})
    return rows


@pytest.mark.parametrize("fmt", ["plain", "sc1-meta", "sc2-repo"])
def test_workers_give_byte_identical_files(tmp_path, tiny, code, fmt):
    tok = _sc1_tokenizer(tmp_path, tiny) if fmt == "sc1-meta" else "builtin:tiny"
    write_jsonl(tmp_path / "in.jsonl", _meta_rows(code, 120), BAD_LINES)
    outputs = []
    for workers in (1, 3):
        prefix = tmp_path / f"w{workers}"
        report = preprocess_corpus(tmp_path / "in.jsonl", tok, str(prefix), fmt=fmt, workers=workers,
                                   chunk_bytes=4000, progress=False)
        assert report.bad == len(BAD_LINES)
        outputs.append((Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()))
    assert outputs[0] == outputs[1]


def test_sc1_metadata_prefixes(tmp_path, tiny, code):
    tok = load_tokenizer(_sc1_tokenizer(tmp_path, tiny))
    rows = _meta_rows(code, 400)
    write_jsonl(tmp_path / "in.jsonl", rows)
    preprocess_corpus(tmp_path / "in.jsonl", str(tok.path), str(tmp_path / "out"), fmt="sc1-meta", progress=False)
    shape = re.compile(r"(<reponame>owner/repo\d)?(<filename>src/m\d+\.py)?(<gh_stars>(0|1-10|10-100|100-1000|1000\+))?")
    seen = {"<reponame>": 0, "<filename>": 0, "<gh_stars>": 0}
    for row, ids in zip(rows, _docs(tmp_path / "out")):
        text = tok.decode(ids[:-1])
        assert text.endswith(row["content"])
        head = text[:len(text) - len(row["content"])]
        if head:  # fields in order, then one newline
            assert head.endswith("\n") and shape.fullmatch(head[:-1]), head
            for name in seen:
                seen[name] += name in head
            stars = head.split("<gh_stars>")[1][:-1] if "<gh_stars>" in head else None
            assert stars in (None, {None: "0", 0: "0", 5: "1-10", 50: "10-100", 500: "100-1000",
                                    5000: "1000+"}[row["max_stars_count"]])
    for count in seen.values():  # each field with probability 0.2 (400 draws: 80 +- 8)
        assert 50 < count < 110, seen


def _repo_docs(tok, prefix) -> list[str]:
    return [tok.decode(ids[:-1]) for ids in _docs(prefix)]


def test_sc2_repository_documents_grouped_from_unsorted_input(tmp_path, tiny, code):
    rows = _meta_rows(code, 70)  # repositories interleaved: owner/repo0..6
    rows.append({"content": "", "repo_name": "owner/repo1", "path": "empty.py"})
    write_jsonl(tmp_path / "in.jsonl", rows)
    report = preprocess_corpus(tmp_path / "in.jsonl", "builtin:tiny", str(tmp_path / "mem"),
                               fmt="sc2-repo", progress=False)
    assert report.repositories == report.documents == 7 and report.empty_documents == 1
    docs = _repo_docs(tiny, tmp_path / "mem")
    by_content = {r["content"]: r for r in rows if r["content"]}
    with_meta = shuffled = 0
    for doc in docs:
        head, *files = doc.split("<file_sep>")
        if head:  # metadata form: <repo_name>R, then path\ncode per file
            with_meta += 1
            repo = head.removeprefix("<repo_name>")
            files = [tuple(f.split("\n", 1)) for f in files]
            members = [(r["path"], r["content"]) for r in rows if r["content"] and r["repo_name"] == repo]
        else:  # bare form: code only
            (repo,) = {by_content[f]["repo_name"] for f in files}
            members = [r["content"] for r in rows if r["content"] and r["repo_name"] == repo]
        assert sorted(files) == sorted(members)
        shuffled += files != members
    assert sum(d.count("<file_sep>") for d in docs) == 70 and 0 < with_meta < 7 and shuffled >= 5
    # spilling to hash partitions (a budget below the input size) gives the same documents
    assert (tmp_path / "in.jsonl").stat().st_size > 2 * 0.01 * 2**20
    preprocess_corpus(tmp_path / "in.jsonl", "builtin:tiny", str(tmp_path / "disk"), fmt="sc2-repo",
                      group_memory_mb=0.01, progress=False)
    assert sorted(_repo_docs(tiny, tmp_path / "disk")) == sorted(docs)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".groupby")]  # cleaned up
    # already grouped input can be streamed
    write_jsonl(tmp_path / "sorted.jsonl", sorted(rows[:-1], key=lambda r: r["repo_name"]))
    preprocess_corpus(tmp_path / "sorted.jsonl", "builtin:tiny", str(tmp_path / "stream"), fmt="sc2-repo",
                      input_grouped=True, progress=False)
    assert sorted(_repo_docs(tiny, tmp_path / "stream")) == sorted(docs)


def test_cli_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["preprocess", "--help"])
    out = capsys.readouterr().out
    for option in ("--input", "--tokenizer", "--output-prefix", "--format", "--json-key", "--workers",
                   "--repo-key", "--path-key", "--stars-key", "--meta-prob", "--seed",
                   "--escape-special-tokens", "--input-grouped", "--group-memory-mb", "--no-progress",
                   "sc1-meta", "sc2-repo", "byte-identical", "--template", "--chat-template",
                   "--commit-markers", "instruct", "commit", "chat", "preference", "_loss_mask"):
        assert option in out


def test_progress_bar_and_cli(tmp_path, capsys, code):
    write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in code[:3]])
    preprocess_corpus(tmp_path / "in.jsonl", "builtin:tiny", str(tmp_path / "a"), json_key="text", progress=True)
    err = capsys.readouterr().err
    assert "docs/s" in err and "tokens/s" in err
    assert main(["preprocess", "--input", str(tmp_path / "in.jsonl"), "--tokenizer", "builtin:tiny",
                 "--output-prefix", str(tmp_path / "b"), "--json-key", "text", "--no-progress"]) == 0
    assert "3 documents" in capsys.readouterr().out
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    assert main(["preprocess", "--input", str(tmp_path / "nope"), "--tokenizer", "builtin:tiny",
                 "--output-prefix", str(tmp_path / "x")]) == 2
    assert "no such input" in capsys.readouterr().err
