"""Faults of the data path (issue 9, findings 5, 6 and 9): data bound to its tokenizer, preprocess
never making things worse, a damaged index cache rebuilt, huge lines in bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from starcoder.config import ConfigError, UserError, load_config
from starcoder.data import build_train_loader, preprocess_corpus
from starcoder.data.tokenizer import PIECE_CHARS, load_tokenizer
from tests.data.conftest import real_tokenizer_path, small_tokenizer, stdlib_sources, write_jsonl


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The same texts tokenised with the tiny tokenizer (8192) and a small one (400)."""
    root = tmp_path_factory.mktemp("bound")
    small = small_tokenizer(root / "small-tokenizer.json")
    write_jsonl(root / "code.jsonl", [{"content": t} for t in stdlib_sources(20, max_bytes=20_000)])
    for name, spec in (("tiny", "builtin:tiny"), ("small", str(small))):
        preprocess_corpus(root / "code.jsonl", spec, str(root / name), progress=False)
    return root


def cfg_for(root: Path, prefix: str, tokenizer: str, *extra: str):
    return load_config("tiny-sc2", [f"data.paths=[{root / prefix}]", f"data.tokenizer={tokenizer}",
                                    f"data.cache_dir={root / 'cache'}", "train.seq_length=64",
                                    "train.max_steps=2", "data.num_workers=0", "data.fim_rate=0.5",
                                    *extra])


def first_batch(cfg, tokenizer):
    return next(build_train_loader(cfg, tokenizer, dp_rank=0, dp_size=1, consumed_samples=0))


def test_data_from_a_larger_vocabulary_is_refused_naming_both(made):
    # Before: not refused (an IndexError inside FIM once a cut meets an id beyond the tables).
    small = load_tokenizer(made / "small-tokenizer.json")
    with pytest.raises(ConfigError) as err:
        first_batch(cfg_for(made, "tiny", str(made / "small-tokenizer.json")), small)
    text = str(err.value)
    assert text.startswith(f"data.paths: {made / 'tiny'} was tokenised with builtin:tiny (vocabulary 8192")
    assert f"data.tokenizer is {made / 'small-tokenizer.json'} (vocabulary 400" in text


def test_data_from_a_smaller_vocabulary_is_refused_naming_both(made, tiny):
    # Before: trained silently on ids that mean other tokens.
    with pytest.raises(ConfigError, match=r"small was tokenised with .*small-tokenizer.json \(vocabulary 400.*"
                                          r"data.tokenizer is builtin:tiny \(vocabulary 8192"):
        first_batch(cfg_for(made, "small", "builtin:tiny"), tiny)


def test_unrecorded_data_is_scanned_once_for_ids_beyond_the_vocabulary(made, tmp_path, tiny):
    for ext in (".bin", ".idx"):  # data without PREFIX.json, as Megatron's preprocess writes it
        (tmp_path / f"foreign{ext}").write_bytes((made / f"tiny{ext}").read_bytes())
    small = load_tokenizer(made / "small-tokenizer.json")
    with pytest.raises(ConfigError, match=rf"data.paths: {tmp_path / 'foreign'}.bin: token id \d+ is at "
                                          r"or above the vocabulary of data.tokenizer .*small-tokenizer.json \(400\)"):
        first_batch(cfg_for(tmp_path, "foreign", str(made / "small-tokenizer.json")), small)
    first_batch(cfg_for(tmp_path, "foreign", "builtin:tiny"), tiny)  # its own tokenizer: fine
    memo = list((tmp_path / "cache").glob("foreign-*-max_token_id.json"))
    assert len(memo) == 1 and json.loads(memo[0].read_text())["max_token_id"] < 8192


def test_the_same_vocabulary_in_another_file_is_accepted(made, tmp_path, tiny):
    # The fingerprint is the vocabulary, not the file's bytes: a re-serialised copy matches.
    from tokenizers import Tokenizer

    Tokenizer.from_file(str(tiny.path)).save(str(tmp_path / "pretty.json"), pretty=True)
    assert (tmp_path / "pretty.json").read_bytes() != tiny.path.read_bytes()
    copy = load_tokenizer(tmp_path / "pretty.json")
    assert copy.fingerprint == tiny.fingerprint
    first_batch(cfg_for(made, "tiny", str(tmp_path / "pretty.json")), copy)


def test_a_truncated_index_cache_file_is_rebuilt(made, tiny, caplog):
    cfg = cfg_for(made, "tiny", "builtin:tiny")
    before = first_batch(cfg, tiny)["tokens"].clone()
    victim = sorted((made / "cache").glob("tiny-train-*-shuffle_idx.npy"))[0]
    victim.write_bytes(victim.read_bytes()[:100])  # before: a ValueError, and never rebuilt
    with caplog.at_level("WARNING"):
        again = first_batch(cfg, tiny)["tokens"]
    assert "unreadable" in caplog.text and "rebuilding" in caplog.text
    assert np.array_equal(before.numpy(), again.numpy())
    np.load(victim)  # whole again


# ----------------------------------------------------------------------------------------------
# Preprocess never makes things worse


def test_a_run_with_only_bad_records_keeps_the_earlier_dataset(tmp_path):
    write_jsonl(tmp_path / "good.jsonl", [{"content": f"x = {i}\n"} for i in range(5)])
    preprocess_corpus(tmp_path / "good.jsonl", "builtin:tiny", str(tmp_path / "data"), progress=False)
    before = {ext: (tmp_path / f"data{ext}").read_bytes() for ext in (".bin", ".idx", ".json")}
    write_jsonl(tmp_path / "text.jsonl", [{"text": f"y = {i}\n"} for i in range(60)])
    # Before: exit 0 and an empty dataset in place of the good one.
    with pytest.raises(UserError, match="0 documents: 60 records have no key 'content'; their keys: "
                                        r"text \(use --json-key text\)"):
        preprocess_corpus(tmp_path / "text.jsonl", "builtin:tiny", str(tmp_path / "data"), progress=False)
    assert {ext: (tmp_path / f"data{ext}").read_bytes() for ext in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin", "data.idx", "data.json",
                                                          "good.jsonl", "text.jsonl"]


def test_an_empty_input_file_is_reported(tmp_path, caplog):
    write_jsonl(tmp_path / "a.jsonl", [{"content": "x = 1\n"}])
    (tmp_path / "b.jsonl").write_bytes(b"\n\n")
    with caplog.at_level("WARNING"):
        report = preprocess_corpus(tmp_path, "builtin:tiny", str(tmp_path / "out" / "d"), progress=False)
    assert report.empty_files == [str(tmp_path / "b.jsonl")]
    assert f"{tmp_path / 'b.jsonl'}: empty" in caplog.text and "empty file" in report.summary()


def test_corrupt_zstd_and_parquet_files_are_counted_by_name(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    pytest.importorskip("pyarrow")
    rows = [{"content": f"z = {i}\n"} for i in range(20)]
    good = zstandard.ZstdCompressor().compress(b"".join(json.dumps(r).encode() + b"\n" for r in rows))
    (tmp_path / "a.jsonl.zst").write_bytes(good[: len(good) // 2] + b"\x00" * 64)
    (tmp_path / "b.parquet").write_bytes(b"PAR1 not really parquet")
    write_jsonl(tmp_path / "c.jsonl", rows[:3])
    report = preprocess_corpus(tmp_path, "builtin:tiny", str(tmp_path / "out" / "d"), progress=False)
    assert sorted(report.corrupt_files) == [str(tmp_path / "a.jsonl.zst"), str(tmp_path / "b.parquet")]
    assert all(why.startswith("corrupt (") for why in report.corrupt_files.values())
    assert report.documents >= 3
    saved = json.loads((tmp_path / "out" / "d.json").read_text())
    assert sorted(saved["corrupt_files"]) == sorted(report.corrupt_files)


def test_temporary_files_of_a_killed_run_are_removed(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"content": t} for t in stdlib_sources(40)] * 30)
    prefix = tmp_path / "out" / "d"
    child = subprocess.Popen([sys.executable, "-c", (
        "from starcoder.data import preprocess_corpus; "
        f"preprocess_corpus({str(tmp_path / 'in.jsonl')!r}, 'builtin:tiny', {str(prefix)!r}, "
        "progress=False, chunk_bytes=4096)")], cwd=Path(__file__).resolve().parents[2])
    deadline = time.time() + 60
    while not list(prefix.parent.glob("d.bin.tmp-*")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    child.kill()
    child.wait()
    left = list(prefix.parent.glob("d.*"))
    assert left and all(".tmp-" in p.name for p in left), left  # half-written, never published
    write_jsonl(tmp_path / "small.jsonl", [{"content": "x = 1\n"}])
    preprocess_corpus(tmp_path / "small.jsonl", "builtin:tiny", str(prefix), progress=False)
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["d.bin", "d.idx", "d.json"]


# ----------------------------------------------------------------------------------------------
# A huge line in bounded memory


def _two_megabyte_line() -> str:
    """Real code as one 2 MB line, with a special-token string, long digit, space and letter runs
    (the cuts that the pre-tokenizer has to be asked about)."""
    code = "".join(stdlib_sources(80))
    body = (code * (2_000_000 // len(code) + 1))[:1_500_000]
    return (body[:700_000] + " <|endoftext|> " + body[700_000:] + "1234567890" * 1000
            + " " * 200_000 + "x" * 3 * PIECE_CHARS + "\ttail\n")


@pytest.mark.parametrize("spec", ["builtin:tiny", "starcoder", "starcoder2"])
def test_a_huge_line_gives_the_ids_of_whole_document_encoding(spec, tmp_path):
    path = spec if spec.startswith("builtin:") else str(real_tokenizer_path(spec))
    tok = load_tokenizer(path)
    line = _two_megabyte_line()
    pieces = list(tok._pieces(line, escape_special=False))
    # Really cut, into small pieces: all but the one holding the space and letter runs, each of
    # them one pre-token.
    assert len(pieces) > 20 and sum(len(p) > 4 * PIECE_CHARS for p in pieces) == 1
    write_jsonl(tmp_path / "in.jsonl", [{"content": line}, {"content": "x = 1\n"}])
    for escape in (False, True) if spec.startswith("builtin:") else (False,):  # time: 2 cores
        preprocess_corpus(tmp_path / "in.jsonl", path, str(tmp_path / "d"), progress=False,
                          escape_special_tokens=escape)
        from starcoder.data.indexed import IndexedTokens

        data = IndexedTokens(tmp_path / "d")
        whole = tok.encode_batch([line], escape_special=escape)[0] + [tok.eod_id]
        assert data[0].tolist() == whole, f"escape_special_tokens={escape}"
        assert data[1].tolist() == tok.encode("x = 1\n") + [tok.eod_id]
        del data
    os.environ.pop("TOKENIZERS_PARALLELISM", None)


def test_a_file_with_another_key_is_named_even_when_others_are_fine(tmp_path, caplog):
    # Before: the {"text": ...} file was dropped with exit 0 and only a count in the report.
    write_jsonl(tmp_path / "a.jsonl", [{"content": "x = 1\n"}])
    write_jsonl(tmp_path / "b.jsonl", [{"text": "y = 2\n", "lang": "py"}] * 4)
    with caplog.at_level("WARNING"):
        report = preprocess_corpus(tmp_path, "builtin:tiny", str(tmp_path / "out" / "d"), progress=False)
    assert report.documents == 1
    line = (f"{tmp_path / 'b.jsonl'}: no usable record (4 records have no key 'content'; their keys: "
            "text, lang (use --json-key text))")
    assert report.unusable_files == [line] and line in caplog.text and line in report.summary()
