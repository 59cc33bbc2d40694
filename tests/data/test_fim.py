"""FIM: sentinel layout, exact recovery, length, repository-level FIM, and the proof that
re-encoding around the cuts equals re-encoding the parts whole."""

import json
import random

import numpy as np
import pytest

from starcoder.data.fim import FimTransform, PartEncoder, fast_path_supported, sample_rng
from starcoder.data.tokenizer import load_tokenizer
from tests.data.conftest import TRICKY

# ---------------------------------------------------------------------------------------------
# Re-encoding around the cuts == full re-encoding


def _check_parts(fast: PartEncoder, full: PartEncoder, seg: np.ndarray, cuts_list) -> tuple[int, bool]:
    """Compare for every cut list; returns the text length and whether tokens were reused."""
    text = fast.tokenizer.decode(seg.tolist())
    for cuts in cuts_list:
        cuts = [0, *cuts, len(text)]
        assert fast.parts(seg, text, cuts) == full.parts(seg, text, cuts), (text, cuts)
    return len(text), fast._plan(seg, text, [(0, len(text))]) is not None


def _encoders(tok):
    fast, full = PartEncoder(tok), PartEncoder(tok, fast=False)
    assert fast.fast, fast.why_slow
    return fast, full


@pytest.mark.parametrize("which", ["tiny", "sc2", "sc1"])
def test_local_reencoding_equals_full_on_real_code(request, which, code):
    tok = request.getfixturevalue(which)
    fast, full = _encoders(tok)
    rng = random.Random(0)
    reused = 0
    for text in code[:25]:
        ids = np.array(tok.encode(text), dtype=np.int64)
        for _ in range(6):  # segments that start and end anywhere, cuts anywhere
            a = rng.randrange(len(ids))
            seg = ids[a:rng.randint(a + 1, min(len(ids), a + 2500))]
            n = len(tok.decode(seg.tolist()))
            reused += _check_parts(fast, full, seg, [sorted((rng.randint(0, n), rng.randint(0, n)))])[1]
    assert reused > 140  # of 150: the fast path is taken, not silently skipped


@pytest.mark.parametrize("which", ["tiny", "sc2"])
def test_local_reencoding_equals_full_at_every_cut(request, which):
    """Every cut position in whitespace runs, indentation, digits, quotes, contractions, CRLF,
    multi-byte characters and literal special-token strings, for segments starting anywhere."""
    tok = request.getfixturevalue(which)
    fast, full = _encoders(tok)
    text = "".join(TRICKY) * 2
    ids = np.array(tok.encode(text), dtype=np.int64)
    for start in range(0, 40, 3):
        seg = ids[start:]
        n = len(tok.decode(seg.tolist()))
        _check_parts(fast, full, seg, [[c] for c in range(n + 1)])  # prefix/suffix at every cut
        assert _check_parts(fast, full, seg, [[c, min(n, c + 7)] for c in range(0, n + 1, 5)])[1]


@pytest.mark.parametrize("which", ["tiny", "sc2"])
def test_local_reencoding_with_characters_split_by_sample_edges(request, which):
    tok = request.getfixturevalue(which)
    fast, full = _encoders(tok)
    text = "x = '日本語のテキスト' # caf\u00e9 \U0001F600\U0001F680 \u00e9t\u00e9\n    y = 'ÿ€𝄞'\n" * 3
    ids = np.array(tok.encode(text), dtype=np.int64)
    split = {0: 0, -1: 0}  # segments starting / ending inside a character, tokens still reused
    for i in range(len(ids) - 1):
        for edge, seg in ((0, ids[i:]), (-1, ids[:len(ids) - i])):  # through every token boundary
            decoded = tok.decode(seg.tolist())
            n = len(decoded)
            _, reused = _check_parts(fast, full, seg, [[c] for c in range(0, n + 1, 4)] + [[n // 3, 2 * n // 3]])
            split[edge] += decoded[edge] == "\ufffd" and reused
    assert split[0] > 5 and split[-1] > 5, split


def test_escaped_special_strings_fall_back_to_full_encoding(tiny):
    fast, full = _encoders(tiny)
    text = "a = '<|endoftext|>'\n  b = '<file_sep>' + c\n"
    escaped = np.array(tiny.encode_batch([text], escape_special=True)[0], dtype=np.int64)
    assert 0 not in escaped  # the literal was kept as text
    n, reused = _check_parts(fast, full, escaped, [])
    assert not reused
    _check_parts(fast, full, escaped, [[c] for c in range(n + 1)])


def test_fast_path_needs_the_proven_pipeline(tiny, tmp_path, code):
    assert fast_path_supported(tiny) == (True, "")
    cfg = tiny.config()
    cfg["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(cfg))
    other = load_tokenizer(tmp_path / "tokenizer.json")
    ok, why = fast_path_supported(other)
    assert not ok and "prefix space" in why
    fim = FimTransform(other, rate=1.0)  # still correct, by full re-encoding
    sample = np.array(other.encode(code[0])[:300], dtype=np.int64)
    assert len(fim(sample, random.Random(0))) == 300


# ---------------------------------------------------------------------------------------------
# The transform


def _sample(tok, texts, length):
    ids = []
    for t in texts:
        ids += tok.encode(t) + [tok.eod_id]
    assert len(ids) >= length
    return np.array(ids[:length], dtype=np.int64)


def _parse(tok, seg):
    """(order, prefix, middle, suffix) token lists of one FIM'd segment."""
    p, m, s = tok.fim_ids()[:3]
    seg = list(seg)
    assert seg[0] == p and seg.count(m) == 1 and seg.count(s) == 1
    if seg[1] == s:  # SPM: <pre><suf> S <mid> P M
        mid = seg.index(m)
        return "spm", None, None, seg[2:mid], seg[mid + 1:]
    si, mi = seg.index(s), seg.index(m)
    return "psm", seg[1:si], seg[mi + 1:], seg[si + 1:mi], None


@pytest.mark.parametrize("spm_rate", [0.0, 1.0])
def test_sentinel_order_and_exact_recovery_of_whole_documents(tiny, code, spm_rate):
    docs = code[:3]
    sample = _sample(tiny, docs + [code[3]], sum(len(tiny.encode(d)) + 1 for d in docs) + 50)
    fim = FimTransform(tiny, rate=1.0, spm_rate=spm_rate)
    for index in range(5):
        out = fim(sample, sample_rng(7, 0, 0, index))
        assert len(out) == len(sample)
        segments = np.split(out, np.flatnonzero(out == tiny.eod_id))
        for doc, seg in zip(docs, segments):
            seg = seg[1:] if seg[0] == tiny.eod_id else seg
            order, prefix, middle, suffix, spm_tail = _parse(tiny, seg)
            assert order == ("spm" if spm_rate else "psm")
            if order == "spm":  # <pre><suf> S <mid> P M: P then M decode to the text before S
                assert tiny.decode(spm_tail) + tiny.decode(suffix) == doc
            else:
                assert tiny.decode(prefix) + tiny.decode(middle) + tiny.decode(suffix) == doc


def test_length_is_kept_by_truncating_or_padding(tiny, code, monkeypatch):
    sample = _sample(tiny, code[:2], 400)
    fim = FimTransform(tiny, rate=1.0, spm_rate=0.0)
    real = fim.encoder.parts
    monkeypatch.setattr(fim.encoder, "parts", lambda seg, text, cuts: [p[:2] for p in real(seg, text, cuts)])
    short = fim(sample, random.Random(1))
    assert len(short) == 400 and short[-1] == fim.pad and (short == fim.pad).sum() > 300
    monkeypatch.setattr(fim.encoder, "parts", lambda seg, text, cuts: [p * 3 for p in real(seg, text, cuts)])
    long = fim(sample, random.Random(1))
    assert len(long) == 400 and fim.pad not in long and long[0] == fim.prefix


def test_repository_level_fim_keeps_file_sep_boundaries(tiny, code):
    sep, repo = tiny.token_to_id("<file_sep>"), tiny.token_to_id("<repo_name>")
    files = [("a.py", code[0][:800]), ("pkg/b.py", code[1][:600]), ("c.py", code[2][:700])]
    doc = [repo] + tiny.encode("me/project")
    for path, text in files:
        doc += [sep] + tiny.encode(f"{path}\n{text}")
    sample = np.array(doc + [tiny.eod_id] + tiny.encode(code[3])[:100], dtype=np.int64)
    fim = FimTransform(tiny, rate=1.0, spm_rate=0.0, split_token="<file_sep>", fragment_rate=1.0)
    out = fim(sample, random.Random(3))
    assert len(out) == len(sample)
    first_eod = list(out).index(tiny.eod_id)
    fragments = np.split(out[:first_eod], np.flatnonzero(out[:first_eod] == sep))
    assert len(fragments) == 4  # <file_sep> count and placement kept
    texts = ["<repo_name>me/project"] + [f"{p}\n{t}" for p, t in files]
    for i, (frag, text) in enumerate(zip(fragments, texts)):
        frag = frag[1:] if i else frag  # drop the separator itself
        _, prefix, middle, suffix, _ = _parse(tiny, frag)
        assert tiny.decode(prefix + middle + suffix) == text  # the path lands in the FIM prefix
    untouched = FimTransform(tiny, rate=0.0, split_token="<file_sep>", fragment_rate=1.0)
    np.testing.assert_array_equal(untouched(sample, random.Random(3)), sample)


def test_rates_and_determinism(tiny, code):
    fim = FimTransform(tiny, rate=0.5, spm_rate=0.25)
    sample = _sample(tiny, [c[:300] for c in code[:30]], 2000)
    segments = spm = 0
    outs = []
    for index in range(40):
        out = fim(sample, sample_rng(11, 0, 0, index))
        outs.append(out)
        np.testing.assert_array_equal(out, fim(sample, sample_rng(11, 0, 0, index)))
        starts = np.flatnonzero(out == fim.prefix)
        segments += len(starts)
        spm += int((out[np.minimum(starts + 1, len(out) - 1)] == fim.suffix).sum())
    total = 40 * len(np.split(sample, np.flatnonzero(sample == tiny.eod_id)))
    assert 0.4 < segments / total < 0.6
    assert 0.15 < spm / segments < 0.35
    assert not np.array_equal(outs[0], outs[1])
