"""`train.init_from` is strict (only vocabulary rows may differ, and only within the padding) and
cheap (a tensor-parallel rank reads only its own slices, from model folders, Hugging Face folders
and checkpoint step folders alike)."""

from contextlib import contextmanager

import pytest
import torch

import starcoder
from starcoder.config import ConfigError, ParallelConfig
from starcoder.convert import weights
from starcoder.convert.export import from_hf
from starcoder.convert.native import write_model_folder
from starcoder.convert.weights import iter_weights, load_weights
from starcoder.models.gpt import GPT
from starcoder.models.init import init_weights
from starcoder.parallel import Grid, init_grid, materialize, parallelize
from starcoder.training.trainer import train
from tests.distributed import World
from tests.test_convert import tiny_hf
from tests.training.helpers import TINY, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def model_folder(corpus, folder, *overrides):
    """A native model folder of the tiny training model, changed by `overrides`."""
    cfg = tiny_config(corpus, folder, *overrides)
    model = GPT(cfg.model)
    init_weights(model, cfg.model, seed=5)
    vocab = cfg.model.vocab_size  # model folders hold the real vocabulary rows only
    write_model_folder(folder, cfg, ((n, p.detach()[:vocab] if n in weights.VOCAB_PADDED else p.detach())
                                     for n, p in model.named_parameters()))
    return folder


@pytest.mark.parametrize("source, target, words", [
    # finding 4: V heads would land in K slots
    (["model.num_query_groups=2"], ["model.num_query_groups=4"], r"blocks\.0\.attn\.kv_proj\.weight has shape"),
    # real vocabulary rows would be zero
    (["model.vocab_size=8000"], ["model.vocab_size=8192"], r"embedding\.word\.weight has shape \(8000, 64\)"),
    # equal shapes, another head layout: 4 heads of 16 read as 2 heads of 32
    (["model.num_query_groups=4"], ["model.num_attention_heads=2", "model.num_query_groups=2"],
     r"model\.num_attention_heads is 4"),
    (["model.num_layers=3"], [], r"blocks\.2\..* is not part of the model \(model\.num_layers: 3 there, 2 here\)"),
])
def test_anything_but_vocabulary_padding_is_an_error(corpus, tmp_path, source, target, words):
    src = model_folder(corpus, tmp_path / "src", *source)
    cfg = tiny_config(corpus, tmp_path / "run", f"train.init_from={src}", *target)
    with pytest.raises(ConfigError, match=rf"^train\.init_from: {src}: .*{words}"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_bad_init_from_path_is_one_line(corpus, tmp_path, capsys):
    from starcoder.cli import main

    sets = [f"--set={s}" for s in (*TINY, f"data.paths=[{corpus}]", f"train.output_dir={tmp_path / 'run'}")]
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "nowhere", tmp_path / "empty"):
        code = main(["train", "--config", "tiny-sc2", *sets, f"--set=train.init_from={path}"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert err.startswith(f"error: train.init_from: {path}: "), err


# --------------------------------------------------------------------------------------------
# Each rank reads only its slices


class CountingReads:
    """Counts the elements read through `get_slice` (the only way `load_weights` reads
    safetensors)."""

    def __init__(self, monkeypatch):
        self.elements = 0
        real = weights.open_safetensors

        @contextmanager
        def counting(path):
            with real(path) as f:
                yield self._File(f, self)

        monkeypatch.setattr(weights, "open_safetensors", counting)

    class _File:
        def __init__(self, f, counter):
            self.f, self.counter = f, counter

        def get_slice(self, name):
            piece, counter = self.f.get_slice(name), self.counter

            class Piece:
                def __getitem__(self, index):
                    out = piece[index]
                    counter.elements += out.numel()
                    return out
            return Piece()


def padded(tensor, shape):
    full = torch.zeros(shape, dtype=tensor.dtype)
    full[: tensor.shape[0]] = tensor
    return full


@pytest.mark.parametrize("kind", ["sc2-untied", "mha", "mqa", "native"])
def test_each_tensor_parallel_rank_reads_only_its_slices(kind, tmp_path, monkeypatch):
    """Both ranks of TP 2 (built with a process-free grid, as `parallelize` allows) get exactly
    their part of the full weights, and each reads little more than half of the model."""
    hf = tiny_hf("sc2-untied" if kind == "native" else kind)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    source = tmp_path / "hf"
    if kind == "native":
        source = from_hf(source, tmp_path / "native")
    cfg, tensors = iter_weights(source)
    full = dict(tensors)
    total = sum(t.numel() for t in full.values())
    reads = CountingReads(monkeypatch)
    for rank in range(2):
        grid = Grid(rank=rank, world_size=2, tp=2)
        with torch.device("meta"):
            model = parallelize(GPT(cfg.model, padded_vocab_size=cfg.model.padded_vocab_size(2)), grid)
        materialize(model, "cpu")
        reads.elements = 0
        load_weights(model, source, grid)
        assert reads.elements < 0.62 * total, (rank, reads.elements / total)
        for name, param in model.named_parameters():
            expected = padded(full[name], param.full_shape)[param.shard_slices] \
                if hasattr(param, "shard_slices") else full[name]
            assert torch.equal(param.detach(), expected.to(param.dtype)), (rank, name)


def test_vocabulary_rows_may_differ_within_the_padding(tmp_path):
    """A source with 1010 rows loads into a 1000-row vocabulary padded to 1024: rows past 1000
    are zero."""
    hf = tiny_hf("sc2-untied")
    hf.resize_token_embeddings(1010)
    hf.config.vocab_size = 1010
    hf.save_pretrained(tmp_path / "hf")
    cfg, tensors = iter_weights(tmp_path / "hf")
    full = dict(tensors)
    cfg.model.vocab_size = 1000
    model = GPT(cfg.model)
    load_weights(model, tmp_path / "hf")
    for name in weights.VOCAB_PADDED:
        param = dict(model.named_parameters())[name].detach()
        assert param.shape[0] == 1024
        assert torch.equal(param[:1000], full[name][:1000]) and not param[1000:].any()


# --------------------------------------------------------------------------------------------
# Checkpoint step folders under a real tensor-parallel process group


def load_on_rank(source):
    grid = init_grid(ParallelConfig(tensor_parallel=2))
    cfg = starcoder.convert.weights.open_weights(source)[2]
    with torch.device("meta"):
        model = parallelize(GPT(cfg.model, padded_vocab_size=cfg.model.padded_vocab_size(2)), grid)
    materialize(model, "cpu")
    load_weights(model, source, grid)
    return {name: (p.detach().clone(), getattr(p, "shard_slices", None), getattr(p, "full_shape", None))
            for name, p in model.named_parameters()}


def test_a_step_folder_loads_slice_by_slice_at_tensor_parallel_2(corpus, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(corpus, run, "train.max_steps=1", "model.vocab_size=8200"))  # padded 8320 at TP 1, 8448 at TP 2
    _, tensors = iter_weights(run)
    full = dict(tensors)
    with World(2) as world:
        results = world.run(load_on_rank, run)
    for rank, loaded in enumerate(results):
        assert loaded.keys() == full.keys()
        for name, (tensor, slices, shape) in loaded.items():
            expected = padded(full[name], shape)[slices] if slices is not None else full[name]
            assert torch.equal(tensor, expected), (rank, name)
