"""Fine-tuning rows: examples padded or packed (deterministic, best fit), their loss masks and
document ids, truncation, exact resume, per-example weights, EOD document ids for pretraining
data, and the settings each kind of data refuses."""

from __future__ import annotations

import math

import numpy as np
import pytest

from starcoder.config import ConfigError, load_config
from starcoder.data import build_train_loader, preprocess_corpus, resolve_epochs
from starcoder.data.indexed import IndexedMask, IndexedTokens
from starcoder.data.packing import example_rows, place
from tests.data.conftest import stdlib_sources, write_jsonl

SEQ = 64
TEMPLATE = "Q: {instruction}\nA: {response}"


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    """40 instruction pairs of varied length (a few longer than a row, two whose prompt alone
    is), and a small pretraining corpus."""
    folder = tmp_path_factory.mktemp("sft")
    code = "\n".join(stdlib_sources(3))
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        start, size = int(rng.integers(0, len(code) - 400)), int(rng.integers(4, 160))
        rows.append({"instruction": f"Continue snippet {i}.", "response": code[start:start + size]})
    rows[5]["instruction"] = rows[17]["instruction"] = code[:400]  # the prompt fills the row
    write_jsonl(folder / "sft.jsonl", rows)
    preprocess_corpus([folder / "sft.jsonl"], "builtin:tiny", str(folder / "sft"), fmt="instruct",
                      template=TEMPLATE, progress=False)
    write_jsonl(folder / "pt.jsonl", [{"content": code[i:i + 30 + i % 150]} for i in range(0, 20000, 200)])
    preprocess_corpus([folder / "pt.jsonl"], "builtin:tiny", str(folder / "pt"), progress=False)
    preprocess_corpus([write_jsonl(folder / "pref.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])],
                      "builtin:tiny", str(folder / "pref"), fmt="preference", progress=False)
    return folder


def _cfg(paths, *overrides):
    return load_config("tiny-sc2", [f"data.paths=[{', '.join(map(str, paths))}]", "data.fim_rate=0",
                                    f"train.seq_length={SEQ}", "train.micro_batch_size=2",
                                    "train.global_batch_size=4", "data.split=100,0,0",
                                    "data.num_workers=0", "train.objective=sft", *overrides])


def _batches(cfg, tiny, count, consumed=0, dp_size=1):
    """`count` global batches from `consumed`: each rank's micro-batches concatenated in order."""
    loaders = [build_train_loader(cfg, tiny, dp_rank=r, dp_size=dp_size, consumed_samples=consumed)
               for r in range(dp_size)]
    accum = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp_size)
    out = []
    for _ in range(count):
        per_rank = [[next(it) for _ in range(accum)] for it in loaders]
        micro = [mb for step in zip(*per_rank) for mb in step]
        out.append({k: np.concatenate([mb[k].numpy() for mb in micro]) for k in micro[0]})
    return out


def _stored(prefix):
    tokens, mask = IndexedTokens(prefix), IndexedMask(f"{prefix}_loss_mask")
    return [(np.asarray(tokens[i]), np.asarray(mask[i])) for i in range(len(tokens))]


def test_place_packs_every_example_once_best_fit_and_deterministically():
    lengths = np.random.default_rng(1).integers(2, 40, size=500)
    rows = place(lengths, 65, True, seed=3, split=0)
    assert sorted(rows.items.tolist()) == list(range(500))
    sums = np.add.reduceat(rows.lengths, rows.ptr[:-1])
    assert sums.max() <= 65 and np.array_equal(rows.lengths, lengths[rows.items])
    lower = math.ceil(lengths.sum() / 65)
    assert len(rows) <= 1.03 * lower  # best fit on small items leaves little room (98% full here)
    again, other = place(lengths, 65, True, seed=3, split=0), place(lengths, 65, True, seed=4, split=0)
    assert np.array_equal(again.items, rows.items) and np.array_equal(again.ptr, rows.ptr)
    assert not np.array_equal(other.items, rows.items)
    single = place(lengths, 65, False, seed=3, split=0)
    assert len(single) == 500 and single.items.tolist() == list(range(500))


@pytest.mark.parametrize("pack", [True, False])
def test_rows_hold_each_example_once_with_its_stored_mask(sft_data, tiny, pack):
    prefix = str(sft_data / "sft")
    stored = _stored(prefix)
    cfg = _cfg([prefix], f"data.pack={str(pack).lower()}")
    assert ("document_ids" in _batches(cfg, tiny, 1)[0]) == pack  # on by default when packing
    cfg.data.document_mask = True
    _, rows = example_rows([prefix], "100,0,0", 0, SEQ, pack, cfg.train.seed, True)
    long = [i for i, (ids, _) in enumerate(stored) if len(ids) > SEQ + 1]
    assert rows.truncated == len(long) >= 4 and rows.dropped == 2  # the two long prompts
    assert (len(rows) < len(stored) - 2) if pack else (len(rows) == len(stored) - 2)
    epoch = len(rows)
    seen = []
    batches = _batches(cfg, tiny, math.ceil(epoch / 4))
    tokens = np.concatenate([b["tokens"] for b in batches])[:epoch]
    loss = np.concatenate([b["loss_mask"] for b in batches])[:epoch]
    for r in range(epoch):
        docs = np.concatenate([b["document_ids"] for b in batches])[r]
        assert docs[0] == 0 and np.all(np.diff(docs) >= 0) and np.all(np.diff(docs) <= 1)
        assert pack or docs.max() <= 1  # unpacked: one example, then padding
        expected_loss = np.zeros(SEQ)
        for d in np.unique(docs):
            at = np.flatnonzero(docs == d)
            match = [i for i, (ids, _) in enumerate(stored)
                     if np.array_equal(ids[:len(at)], tokens[r, at]) and len(ids) >= len(at)]
            if not match:  # the padding: EOD after the last example, no loss
                assert d == docs[-1] and np.all(tokens[r, at] == tiny.eod_id)
                continue
            ids, mask = stored[match[0]]
            assert len(at) == min(len(ids), SEQ + 1)
            seen.append(match[0])
            expected_loss[at[:-1]] = mask[1:len(at)]  # the label of position t is token t + 1
        assert np.array_equal(loss[r], expected_loss)
    assert sorted(seen) == [i for i in range(len(stored)) if i not in (5, 17)]


def test_resume_and_data_parallel_size_give_the_same_batches(sft_data, tiny):
    cfg = _cfg([sft_data / "sft"], "data.pack=true")
    whole = _batches(cfg, tiny, 12)  # several epochs: rows reshuffled each
    assert not np.array_equal(whole[0]["tokens"], whole[len(whole) // 2]["tokens"])
    resumed = _batches(cfg, tiny, 5, consumed=7 * 4, dp_size=2)
    for a, b in zip(whole[7:], resumed):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_example_normalisation_weights_each_example_once(sft_data, tiny):
    cfg = _cfg([sft_data / "sft"], "data.pack=true", "train.loss_normalization=example")
    plain = _batches(_cfg([sft_data / "sft"], "data.pack=true"), tiny, 3)
    for batch, ref in zip(_batches(cfg, tiny, 3), plain):
        for row, ref_row, docs in zip(batch["loss_mask"], ref["loss_mask"], batch["document_ids"]):
            owners = docs[1:]
            for d in np.unique(owners[ref_row > 0]):
                mine = owners == d
                assert np.allclose(row[mine], ref_row[mine] / ref_row[mine].sum())
            assert np.all((row > 0) == (ref_row > 0))
    # under `lm` every token of an example is a label, never across examples or into padding
    lm = _batches(_cfg([sft_data / "sft"], "data.pack=true", "train.objective=lm"), tiny, 2)
    for batch in lm:
        for row, docs, loss in zip(batch["tokens"], batch["document_ids"], batch["loss_mask"]):
            last = docs == docs[-1]  # the padding when all EOD (no example is only EODs)
            pad = last if np.all(row[last] == tiny.eod_id) else np.zeros_like(last)
            assert np.array_equal(loss > 0, (docs[1:] == docs[:-1]) & ~pad[1:])


def test_pretraining_document_ids_come_from_eod(sft_data, tiny):
    cfg = _cfg([sft_data / "pt"], "train.objective=lm", "data.document_mask=true")
    ref = _batches(_cfg([sft_data / "pt"], "train.objective=lm"), tiny, 3)
    for batch, plain in zip(_batches(cfg, tiny, 3), ref):
        assert "document_ids" not in plain and np.array_equal(batch["tokens"], plain["tokens"])
        assert np.array_equal(batch["loss_mask"], plain["loss_mask"])
        for row, docs in zip(batch["tokens"], batch["document_ids"]):
            ends = np.flatnonzero(row == tiny.eod_id)
            assert len(ends) and docs.tolist() == [int(np.sum(ends < j)) for j in range(SEQ + 1)]
            assert docs[-1] > 0  # every row here holds the ends of documents


def test_epochs_set_the_number_of_steps(sft_data, tiny):
    cfg = _cfg([sft_data / "sft"], "data.pack=true", "train.epochs=3", "train.max_steps=1000")
    _, rows = example_rows([str(sft_data / "sft")], "100,0,0", 0, SEQ, True, cfg.train.seed, True)
    resolved = resolve_epochs(cfg)
    assert resolved.train.max_steps == math.ceil(3 * len(rows) / 4) and cfg.train.max_steps == 1000
    plain = _cfg([sft_data / "sft"])
    assert resolve_epochs(plain) is plain  # without train.epochs, train.max_steps stands


@pytest.mark.parametrize("paths, overrides, message", [
    (["pt"], [], "train.objective: sft needs fine-tuning data with a loss mask"),
    (["pt"], ["train.objective=lm", "data.pack=true"], "data.pack: data.paths is pretraining data"),
    (["pt"], ["train.objective=lm", "train.epochs=2"], "train.epochs: 2 needs fine-tuning data"),
    (["pt"], ["train.objective=lm", "train.loss_normalization=example"],
     "train.loss_normalization: example needs fine-tuning data"),
    (["sft", "pt"], [], "data.paths: .*sft is fine-tuning data .* but .*pt is pretraining data"),
    (["pref"], [], r"data.paths\[0\]: .*pref holds preference pairs"),
    (["0.5 {sft}"], [], r"data.paths\[0\].weight: fine-tuning sources are concatenated"),
    (["sft"], ["data.fim_rate=0.5"], "data.fim_rate: fill-in-the-middle applies to pretraining data"),
])
def test_settings_the_data_cannot_serve_name_their_key(sft_data, tiny, paths, overrides, message):
    paths = [p.format(sft=sft_data / "sft") if "{" in p else sft_data / p for p in paths]
    with pytest.raises(ConfigError, match=message):
        next(iter(build_train_loader(_cfg(paths, *overrides), tiny, dp_rank=0, dp_size=1,
                                     consumed_samples=0)))

