import importlib.util
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from starcoder.data.tokenizer import MissingTokenError, load_tokenizer
from tests.data.conftest import TRICKY

ROOT = Path(__file__).resolve().parents[2]


def _make_script():
    spec = importlib.util.spec_from_file_location("make_tiny", ROOT / "tools/make_tiny_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_tokenizer_has_starcoder2_special_tokens(tiny):
    assert tiny.vocab_size == 8192
    names = _make_script().SPECIAL_TOKENS
    assert len(names) == 38 and tiny.special_tokens == {t: i for i, t in enumerate(names)}
    assert tiny.eod_id == 0 and tiny.fim_ids() == (1, 2, 3, 4)
    cfg = tiny.config()
    assert cfg["normalizer"] is None and cfg["model"]["type"] == "BPE"
    assert [p["type"] for p in cfg["pre_tokenizer"]["pretokenizers"]] == ["Digits", "ByteLevel"]
    # digits are split one by one, like the real tokenizers
    assert tiny.backend.encode("x = 12345").tokens[-5:] == list("12345")


def test_encode_decode_round_trip_and_specials(tiny):
    for text in TRICKY:
        assert tiny.decode(tiny.encode(text)) == text
    ids = tiny.encode("a<|endoftext|>b<file_sep>")
    assert 0 in ids and tiny.token_to_id("<file_sep>") in ids
    assert tiny.token_to_id("<no such token>") is None


def test_tiny_special_ids_equal_the_real_starcoder2(tiny, sc2):
    assert tiny.special_tokens == sc2.special_tokens


def test_real_tokenizers_known_ids(sc1, sc2):
    text = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n-1) + fibonacci(n-2)\n"
    assert sc1.encode(text)[:5] == [589, 28176, 34682, 26, 96]
    assert sc2.encode(text)[:5] == [610, 28319, 34789, 45, 115]
    assert sc1.encode("def print_hello") == [589, 1459, 81, 7656]
    assert sc1.fim_ids() == sc2.fim_ids() == (1, 2, 3, 4)
    assert sc1.token_to_id("<reponame>") == 18 and sc2.token_to_id("<file_sep>") == 6


def _tokenizer_with(tmp_path: Path, tiny, drop=(), rename=None) -> Path:
    """The tiny tokenizer.json with special tokens removed or renamed."""
    cfg = tiny.config()
    rename = rename or {}
    added = []
    for t in cfg["added_tokens"]:
        if t["content"] in drop:
            continue
        new = rename.get(t["content"], t["content"])
        cfg["model"]["vocab"][new] = cfg["model"]["vocab"].pop(t["content"])
        added.append({**t, "content": new})
    for name in drop:
        cfg["model"]["vocab"].pop(name, None)
    cfg["added_tokens"] = added
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(cfg))
    return path


def test_missing_fim_token_is_named(tmp_path, tiny):
    tok = load_tokenizer(_tokenizer_with(tmp_path, tiny, drop=("<fim_pad>",)))
    assert tok.fim_id("prefix") == 1
    with pytest.raises(MissingTokenError, match="<fim_pad>.*<fim-pad>"):
        tok.fim_ids()


def test_santacoder_hyphenated_fim_tokens(tmp_path, tiny):
    names = {f"<fim_{n}>": f"<fim-{n}>" for n in ("prefix", "middle", "suffix", "pad")}
    tok = load_tokenizer(_tokenizer_with(tmp_path, tiny, rename=names))
    assert tok.token_to_id("<fim_prefix>") is None and tok.fim_ids() == (1, 2, 3, 4)


def test_load_from_folder_and_save_is_byte_identical(tmp_path, tiny):
    saved = tiny.save(tmp_path / "model")
    assert saved.read_bytes() == tiny.path.read_bytes()
    again = load_tokenizer(tmp_path / "model")
    assert again.encode(TRICKY[0]) == tiny.encode(TRICKY[0])
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="builtin:tiny"):
        load_tokenizer("builtin:huge")


def test_sentencepiece_model(tmp_path, code):
    spm = pytest.importorskip("sentencepiece")
    (tmp_path / "corpus.txt").write_text("\n".join(code[:5]))
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=600,
        user_defined_symbols=["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"],
        minloglevel=2)
    tok = load_tokenizer(tmp_path / "sp.model")
    assert tok.vocab_size == 600 and tok.eod_id == tok.token_to_id("<|endoftext|>")
    assert tok.decode(tok.encode("def f(x): return x")) == "def f(x): return x"
    assert set(tok.fim_ids()) == {tok.token_to_id(f"<fim_{n}>") for n in ("prefix", "middle", "suffix", "pad")}
    assert tok.save(tmp_path / "out").read_bytes() == (tmp_path / "sp.model").read_bytes()
    assert load_tokenizer(tmp_path / "out").encode("x = 1") == tok.encode("x = 1")


@pytest.mark.skipif(platform.python_version() != "3.11.7",
                    reason="the committed tiny tokenizer was trained on CPython 3.11.7's standard "
                           "library; other builds give a different (equally valid) file")
def test_committed_tiny_tokenizer_is_what_the_script_makes(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "tools/make_tiny_tokenizer.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    committed = ROOT / "starcoder/assets/tokenizers/tiny/tokenizer.json"
    assert (tmp_path / "tokenizer.json").read_bytes() == committed.read_bytes()
