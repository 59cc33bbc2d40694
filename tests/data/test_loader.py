"""Loaders: Megatron sample order over data-parallel ranks, resume, workers, masks, blends, the
index cache, and rank-0 building behind a barrier (a 2-rank gloo world)."""

import os

import numpy as np
import pytest
import torch

from starcoder.config import ConfigError, load_config
from starcoder.data import build_train_loader, build_valid_loader, helpers, preprocess_corpus
from starcoder.data import dataset as dataset_module
from starcoder.data.loader import build_samples
from tests.data.conftest import stdlib_sources, write_jsonl
from tests.distributed import World


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three small sources preprocessed with the tiny tokenizer."""
    root = tmp_path_factory.mktemp("corpus")
    code = stdlib_sources(60, max_bytes=20_000)
    prefixes = []
    for i, texts in enumerate((code[:25], code[25:45], code[45:] + ["x = 1  # <fim_pad>\n" * 40] * 20)):
        write_jsonl(root / f"s{i}.jsonl", [{"content": t} for t in texts])
        preprocess_corpus(root / f"s{i}.jsonl", "builtin:tiny", str(root / f"s{i}"), progress=False)
        prefixes.append(str(root / f"s{i}"))
    return prefixes


def make_cfg(paths, cache, *extra, fim=0.0):
    cache = "null" if cache is None else cache
    return load_config("tiny-sc2", [f"data.paths={paths!r}", f"data.cache_dir={cache}", "train.seq_length=64",
                                    "train.max_steps=30", "train.global_batch_size=8", "train.micro_batch_size=4",
                                    f"data.fim_rate={fim}", "data.num_workers=0", "data.split=90,10,0",
                                    "train.eval_steps=2", *extra])


def take(it, n):
    return [next(it) for _ in range(n)]


def stacked(batches):
    return torch.cat([b["tokens"] for b in batches])


def test_batches_have_the_promised_layout(corpus, tmp_path, tiny):
    cfg = make_cfg(corpus[:1], tmp_path)
    batch = next(build_train_loader(cfg, tiny, dp_rank=0, dp_size=1, consumed_samples=0))
    assert batch["tokens"].dtype == torch.int64 and batch["tokens"].shape == (4, 65)
    assert batch["loss_mask"].dtype == torch.float32 and batch["loss_mask"].shape == (4, 64)
    assert torch.all(batch["loss_mask"] == 1)
    assert 0 <= batch["tokens"].min() and batch["tokens"].max() < tiny.vocab_size


def test_data_parallel_ranks_split_the_same_global_batches(corpus, tmp_path, tiny):
    one = make_cfg(corpus[:2], tmp_path, fim=0.5)
    single = stacked(take(build_train_loader(one, tiny, dp_rank=0, dp_size=1, consumed_samples=0), 6))
    two = make_cfg(corpus[:2], tmp_path, "train.micro_batch_size=2", fim=0.5)
    ranks = [take(build_train_loader(two, tiny, dp_rank=r, dp_size=2, consumed_samples=0), 6) for r in (0, 1)]
    # micro-step k: rank 0 holds samples [4k, 4k+2), rank 1 [4k+2, 4k+4)
    interleaved = torch.cat([torch.cat([ranks[0][k]["tokens"], ranks[1][k]["tokens"]]) for k in range(6)])
    torch.testing.assert_close(interleaved, single)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_resume_and_workers_give_identical_fim_streams(corpus, tmp_path, tiny):
    cfg = make_cfg(corpus[:2], tmp_path, fim=0.5)
    reference = take(build_train_loader(cfg, tiny, dp_rank=0, dp_size=1, consumed_samples=0), 8)
    assert any((b["tokens"] == tiny.fim_id("prefix")).any() for b in reference)  # FIM happened
    for workers in (1, 3):
        cfg.data.num_workers = workers
        got = take(build_train_loader(cfg, tiny, dp_rank=0, dp_size=1, consumed_samples=0), 8)
        torch.testing.assert_close(stacked(got), stacked(reference))
    resumed = take(build_train_loader(cfg, tiny, dp_rank=0, dp_size=1, consumed_samples=24), 2)
    torch.testing.assert_close(stacked(resumed), stacked(reference[6:8]))  # step 3 = samples 24..31


def test_stream_wraps_into_a_new_epoch(corpus, tmp_path, tiny):
    cfg = make_cfg(corpus[:1], tmp_path, "train.max_steps=2", fim=0.5)
    batches = take(build_train_loader(cfg, tiny, dp_rank=0, dp_size=1, consumed_samples=0), 8)
    plain = make_cfg(corpus[:1], tmp_path, "train.max_steps=2")
    unfimmed = take(build_train_loader(plain, tiny, dp_rank=0, dp_size=1, consumed_samples=0), 8)
    torch.testing.assert_close(stacked(unfimmed[:4]), stacked(unfimmed[4:]))  # same 16 samples again
    assert not torch.equal(stacked(batches[:4]), stacked(batches[4:]))  # with new FIM draws


def test_loss_masks(corpus, tmp_path, tiny):
    pad = tiny.fim_id("pad")
    cfg = make_cfg(corpus[2:], tmp_path, "data.mask_eod_loss=true", "data.mask_fim_pad_loss=true")
    seen_eod = seen_pad = False
    for batch in take(build_train_loader(cfg, tiny, dp_rank=0, dp_size=1, consumed_samples=0), 20):
        tokens, mask = batch["tokens"], batch["loss_mask"]
        expected = ~((tokens[:, :-1] == tiny.eod_id) | (tokens[:, 1:] == pad))
        torch.testing.assert_close(mask, expected.float())
        seen_eod |= bool((tokens[:, :-1] == tiny.eod_id).any())
        seen_pad |= bool((tokens[:, 1:] == pad).any())
    assert seen_eod and seen_pad


def test_blends_hit_their_weights(corpus, tmp_path):
    cfg = make_cfg([f"{w} {p}" for w, p in zip((6, 3, 1), corpus)], tmp_path, "train.max_steps=500")
    samples = build_samples(cfg, 0, 4000)
    np.testing.assert_allclose(np.bincount(samples.which[:4000]) / 4000, [0.6, 0.3, 0.1], atol=0.01)
    # each blended sample is the chosen source's sample
    picked = samples.gather(np.arange(0, 4000, 97), 65)
    for row, i in enumerate(range(0, 4000, 97)):
        src = samples.sources[samples.which[i]]
        alone = np.empty((1, 65), np.int64)
        src.gather(alone, np.array([0]), np.array([samples.within[i]]))
        np.testing.assert_array_equal(picked[row], alone[0])


def test_python_and_cpp_builders_give_the_same_batches(corpus, tmp_path, tiny, monkeypatch):
    cfg = make_cfg([f"{w} {p}" for w, p in zip((2, 1), corpus)], tmp_path / "cpp", fim=0.5)
    fast = take(build_train_loader(cfg, tiny, dp_rank=0, dp_size=1, consumed_samples=0), 4)
    monkeypatch.setattr(helpers, "cpp", None)
    cfg = make_cfg([f"{w} {p}" for w, p in zip((2, 1), corpus)], tmp_path / "py", fim=0.5)
    slow = take(build_train_loader(cfg, tiny, dp_rank=0, dp_size=1, consumed_samples=0), 4)
    torch.testing.assert_close(stacked(slow), stacked(fast))
    assert sorted(os.listdir(tmp_path / "py")) == sorted(os.listdir(tmp_path / "cpp"))


def test_index_cache_is_reused_and_rebuilt_when_inputs_change(corpus, tmp_path, tiny, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for ext in (".bin", ".idx", ".json"):
        (src / f"d{ext}").write_bytes(open(corpus[0] + ext, "rb").read())
    cfg = make_cfg([str(src / "d")], None)  # default: index_cache beside the data
    next(build_train_loader(cfg, tiny, dp_rank=0, dp_size=1, consumed_samples=0))
    cache = src / "index_cache"
    first = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert len(first) == 4  # doc, sample, shuffle indices + description
    calls = []
    original = helpers.document_index
    monkeypatch.setattr(helpers, "document_index", lambda *a, **k: calls.append(a) or original(*a, **k))
    next(build_train_loader(cfg, tiny, dp_rank=0, dp_size=1, consumed_samples=0))
    assert not calls and {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == first
    os.utime(src / "d.idx", ns=(1, 1))  # "re-preprocessed"
    next(build_train_loader(cfg, tiny, dp_rank=0, dp_size=1, consumed_samples=0))
    assert len(calls) == 1 and len(list(cache.iterdir())) == 8
    # a read-only data folder: the cache goes under train.output_dir
    monkeypatch.setattr(dataset_module.os, "access", lambda path, mode: False)
    cfg.train.output_dir = str(tmp_path / "run")
    next(build_train_loader(cfg, tiny, dp_rank=0, dp_size=1, consumed_samples=0))
    assert len(list((tmp_path / "run" / "index_cache").iterdir())) == 4


def test_valid_loader_is_fresh_and_deterministic(corpus, tmp_path, tiny):
    cfg = make_cfg(corpus[:2], tmp_path, fim=0.5)
    first = list(build_valid_loader(cfg, tiny, dp_rank=0, dp_size=1))
    second = list(build_valid_loader(cfg, tiny, dp_rank=0, dp_size=1))
    assert len(first) == 4  # eval_steps 2 x global 8 / micro 4
    torch.testing.assert_close(stacked(first), stacked(second))
    train = take(build_train_loader(cfg, tiny, dp_rank=0, dp_size=1, consumed_samples=0), 4)
    assert not torch.equal(stacked(train), stacked(first))
    cfg.data.split = "100,0,0"
    assert build_valid_loader(cfg, tiny, dp_rank=0, dp_size=1) is None


def test_config_errors_name_the_key(corpus, tmp_path, tiny):
    with pytest.raises(ConfigError, match="^data.paths: no training data"):
        build_train_loader(make_cfg([], tmp_path), tiny, dp_rank=0, dp_size=1, consumed_samples=0)
    with pytest.raises(ConfigError, match="^data.paths: .*no such index file"):
        build_train_loader(make_cfg([str(tmp_path / "nope")], tmp_path), tiny, dp_rank=0, dp_size=1,
                           consumed_samples=0)
    with pytest.raises(ConfigError, match="^data.split: .* no training documents"):
        build_train_loader(make_cfg(corpus[:1], tmp_path, "data.split=0,100,0"), tiny, dp_rank=0, dp_size=1,
                           consumed_samples=0)
    with pytest.raises(ConfigError, match="^train.global_batch_size: 8 is not divisible"):
        build_train_loader(make_cfg(corpus[:1], tmp_path), tiny, dp_rank=0, dp_size=3, consumed_samples=0)
    broken = tmp_path / "broken"
    (tmp_path / "broken.idx").write_bytes(b"garbage" * 10)
    (tmp_path / "broken.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="^data.paths: .*bad magic"):
        build_train_loader(make_cfg([str(broken)], tmp_path), tiny, dp_rank=0, dp_size=1, consumed_samples=0)
    with pytest.raises(ConfigError, match="^data.fim_split_sample: .*<no_such_sep>"):
        build_train_loader(make_cfg(corpus[:1], tmp_path, "data.fim_split_sample=<no_such_sep>", fim=0.5),
                           tiny, dp_rank=0, dp_size=1, consumed_samples=0)


def _rank_batches(paths, cache, steps):
    """On each rank of a 2-rank world: its micro-batches, and how many indices it built."""
    import torch.distributed as dist

    from starcoder.data import helpers as h
    from starcoder.data import load_tokenizer

    built = []
    original = h.document_index
    h.document_index = lambda *a, **k: built.append(1) or original(*a, **k)
    try:
        cfg = make_cfg(paths, cache, "train.micro_batch_size=2", fim=0.5)
        it = build_train_loader(cfg, load_tokenizer("builtin:tiny"), dp_rank=dist.get_rank(), dp_size=2,
                                consumed_samples=8)
        return [next(it)["tokens"] for _ in range(steps)], len(built)
    finally:
        h.document_index = original


def test_rank_zero_builds_behind_a_barrier(corpus, tmp_path, tiny):
    with World(2) as world:
        (r0, built0), (r1, built1) = world.run(_rank_batches, corpus[:2], str(tmp_path), 4)
    assert built0 == 2 and built1 == 0  # two sources, built once, on rank 0
    cfg = make_cfg(corpus[:2], tmp_path, fim=0.5)
    single = stacked(take(build_train_loader(cfg, tiny, dp_rank=0, dp_size=1, consumed_samples=8), 4))
    interleaved = torch.cat([torch.cat([r0[k], r1[k]]) for k in range(4)])
    torch.testing.assert_close(interleaved, single)


def test_batches_held_by_the_caller_are_never_overwritten(corpus, tmp_path, tiny):
    cfg = make_cfg(corpus[:1], tmp_path)
    it = build_train_loader(cfg, tiny, dp_rank=0, dp_size=1, consumed_samples=0)
    copies = [{k: v.clone() for k, v in next(it).items()} for _ in range(12)]  # dropped at once
    held = take(build_train_loader(cfg, tiny, dp_rank=0, dp_size=1, consumed_samples=0), 12)
    for h, c in zip(held, copies):
        torch.testing.assert_close(h["tokens"], c["tokens"])
        torch.testing.assert_close(h["loss_mask"], c["loss_mask"])
    pointers = {next(it)["tokens"].data_ptr() for _ in range(12)}
    assert len(pointers) <= 2  # a dropped batch's memory is reused (no fresh page faults)


def test_datasets_pickle_by_file_name(corpus, tmp_path, tiny):
    """Spawned DataLoader workers receive the dataset pickled: indices and tokens must travel as
    file names, not as their contents."""
    import pickle

    cfg = make_cfg([f"{w} {p}" for w, p in zip((2, 1), corpus)], tmp_path)
    samples = build_samples(cfg, 0, 240)
    blob = pickle.dumps(samples)
    assert len(blob) < 10_000
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again.gather(np.arange(40), 65), samples.gather(np.arange(40), 65))


def test_a_split_without_tokens_names_data_split(tmp_path, tiny):
    from starcoder.data.indexed import IndexedWriter

    with IndexedWriter(tmp_path / "one", np.uint16) as w:  # Megatron files may hold 1-token documents
        w.add_document(np.array([0]))
        w.add_document(np.arange(100))
    cfg = make_cfg([str(tmp_path / "one")], tmp_path, "data.split=50,50,0")
    with pytest.raises(ConfigError, match="^data.split: .*train split .* needs more than one"):
        build_train_loader(cfg, tiny, dp_rank=0, dp_size=1, consumed_samples=0)


def test_recycled_arrays_are_reused_only_once_released():
    from starcoder.data.loader import Recycler

    recycler = Recycler((4, 8), np.int64, keep=2)
    first = recycler.get()
    held = torch.from_numpy(first)[:, 1:]  # a view of a tensor over the array: still in use
    del first
    second = recycler.get()
    assert second is not held.numpy().base and not np.shares_memory(second, held.numpy())
    del held
    third = recycler.get()
    assert third is recycler.arrays[0]  # released, so reused
    del second, third
    assert recycler.get() is recycler.arrays[0]
