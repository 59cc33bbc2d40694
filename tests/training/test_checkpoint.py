"""Checkpoints in one process: exact round trip, no unpickling, atomic commits, pruning, and
reading a run or step folder as weights (load_model, convert to-hf)."""

import pickle

import pytest
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM

import starcoder
from starcoder.convert.weights import iter_weights
from starcoder.config import ConfigError
from starcoder.convert.export import to_hf
from starcoder.data import load_tokenizer
from starcoder.parallel.grid import Grid
from starcoder.convert import checkpoints
from starcoder.training import checkpoint as ckpt
from starcoder.training.optimizer import build_optimizer, optimizer_state
from starcoder.training.trainer import build_model
from tests.training.helpers import tiny_config

CPU = torch.device("cpu")


@pytest.fixture
def setup(corpus, tmp_path):
    """A tiny model and AdamW after two real steps, and everything save_checkpoint needs."""
    cfg = tiny_config(corpus, tmp_path / "run")
    model = build_model(cfg, Grid(), CPU)
    opt = build_optimizer(model, cfg, Grid(), CPU)
    ids = torch.randint(0, 1000, (2, 17), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(ids[:, :-1], ids[:, 1:]).mean().backward()
        opt.step()
        opt.zero_grad()
    tok = load_tokenizer(cfg.data.tokenizer)

    def save(step, model=model, opt=opt, keep_last=None):
        state = {"train_state": {"step": step}, "world": {"size": 1}}
        return ckpt.save_checkpoint(tmp_path / "run", step, model, opt, Grid(), CPU, cfg, tok, state,
                                    keep_last)

    return cfg, model, opt, save


def fresh(cfg):
    model = build_model(cfg, Grid(), CPU)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model, build_optimizer(model, cfg, Grid(), CPU)


def test_round_trip_is_exact(setup, tmp_path):
    cfg, model, opt, save = setup
    torch.manual_seed(123)
    step_dir = save(7)
    expected_random = torch.rand(3)
    assert checkpoints.latest_checkpoint(tmp_path / "run") == step_dir and step_dir.name == "step_0000007"

    model2, opt2 = fresh(cfg)
    torch.manual_seed(0)
    state = ckpt.load_checkpoint(step_dir, model2, opt2, Grid(), CPU, cfg)
    assert state["train_state"] == {"step": 7}
    assert torch.equal(torch.rand(3), expected_random)  # the RNG continues where it was saved
    for (name, p), p2 in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, p2), name
    s1, s2 = optimizer_state(opt, model), optimizer_state(opt2, model2)
    for name in s1:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1[name][key], s2[name][key]), (name, key)
    assert float(s2["final_norm.weight"]["step"]) == 2.0


def test_loading_unpickles_nothing(setup, tmp_path, monkeypatch):
    cfg, model, opt, save = setup
    step_dir = save(1)
    files = [p.name for p in (step_dir / "dcp").iterdir()]
    assert files == ["shard-00001-model-00001-of-00001.safetensors"]  # no pickled .metadata

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    model2, opt2 = fresh(cfg)
    ckpt.load_checkpoint(step_dir, model2, opt2, Grid(), CPU, cfg)
    assert torch.equal(model2.final_norm.weight, model.final_norm.weight)
    _, tensors = iter_weights(tmp_path / "run")
    assert len(dict(tensors)) == len(list(model.parameters()))


@pytest.mark.parametrize("phase", ["shard file", "tokenizer", "latest pointer"])
def test_a_crash_while_saving_leaves_the_previous_checkpoint(setup, tmp_path, monkeypatch, phase):
    cfg, model, opt, save = setup
    good = save(1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def crash(*args, **kwargs):
        raise OSError(f"crash injected in the {phase}")

    if phase == "shard file":  # half a safetensors file on disk, then the crash
        real = safetensors.torch.save

        def half_then_crash(tensors, metadata=None):
            data = real(tensors, metadata)
            monkeypatch.setattr(ckpt.os, "fsync", crash)  # DCP fsyncs right after writing
            return data[: len(data) // 2]

        monkeypatch.setattr(safetensors.torch, "save", half_then_crash)
    elif phase == "tokenizer":
        monkeypatch.setattr(type(load_tokenizer("builtin:tiny")), "save", crash)
    else:
        monkeypatch.setattr(ckpt, "_write_atomic", crash)
    with pytest.raises(BaseException, match="crash injected"):  # DCP wraps it in a BaseException
        save(2)
    monkeypatch.undo()

    run = tmp_path / "run"
    partial = run / "checkpoints/.step_0000002.partial"
    if phase == "latest pointer":  # renamed, but `latest` never moved to it
        assert (run / "checkpoints/step_0000002").is_dir() and not partial.exists()
    else:
        assert partial.is_dir() and not (run / "checkpoints/step_0000002").exists()
    if phase == "shard file":
        shard = "dcp/shard-00001-model-00001-of-00001.safetensors"
        assert (partial / shard).stat().st_size < (good / shard).stat().st_size
    assert checkpoints.latest_checkpoint(run) == good
    model2, opt2 = fresh(cfg)
    ckpt.load_checkpoint(good, model2, opt2, Grid(), CPU, cfg)
    assert all(torch.equal(p, before[n]) for n, p in model2.named_parameters())
    ckpt.remove_partial(run)  # what the next start does
    assert not list((run / "checkpoints").glob(".*partial"))
    assert save(2).name == "step_0000002"  # and saving that step again works
    assert checkpoints.latest_checkpoint(run).name == "step_0000002"


def test_keep_last_prunes_older_steps(setup, tmp_path):
    cfg, model, opt, save = setup
    for step in (1, 2, 3, 4):
        save(step, keep_last=2)
    names = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert names == ["latest", "step_0000003", "step_0000004"]


def test_run_and_step_folders_read_as_models(setup, tmp_path):
    cfg, model, opt, save = setup
    save(1)
    step_dir = save(2)
    run = tmp_path / "run"
    assert checkpoints.resolve_checkpoint(run) == checkpoints.resolve_checkpoint(run / "checkpoints") == step_dir
    assert checkpoints.resolve_checkpoint(run / "checkpoints/step_0000001").name == "step_0000001"
    assert checkpoints.resolve_checkpoint(tmp_path) is None
    config, tensors = iter_weights(run)
    tensors = dict(tensors)
    assert config.model == cfg.model
    assert tensors["embedding.word.weight"].shape == (cfg.model.vocab_size, cfg.model.hidden_size)
    for name, p in model.named_parameters():
        assert torch.equal(tensors[name], p[: cfg.model.vocab_size] if name.startswith("embedding.word") else p)

    ids = torch.randint(0, 1000, (2, 20))
    ours = starcoder.load_model(run)
    to_hf(run, tmp_path / "hf")  # `starcoder convert to-hf --checkpoint RUN`
    assert (tmp_path / "hf/tokenizer.json").is_file()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() < 1e-4
        assert (ours(ids) - model(ids)).abs().max() == 0


def test_a_model_that_does_not_fit_names_the_key(setup, corpus, tmp_path):
    cfg, model, opt, save = setup
    step_dir = save(1)
    other = tiny_config(corpus, tmp_path / "run", "model.num_layers=3")
    model2 = build_model(other, Grid(), CPU)
    with pytest.raises(ConfigError, match="^model.num_layers: the checkpoint"):
        ckpt.load_checkpoint(step_dir, model2, build_optimizer(model2, other, Grid(), CPU), Grid(), CPU, other)


def test_vocabulary_tensors_load_at_another_padding(corpus, tmp_path):
    """Vocabulary 8200 pads to 8320 rows at a multiple of 128 and to 8448 at 256 (as at TP 2): a
    checkpoint loads at the other padding and back, the real rows of weights and Adam state carry
    over exactly, and padding rows are zero."""
    sets = ("model.vocab_size=8200", "model.tie_word_embeddings=false")
    configs = {rows: tiny_config(corpus, tmp_path / str(rows), *sets,
                                 f"model.make_vocab_size_divisible_by={multiple}")
               for rows, multiple in ((8320, 128), (8448, 256))}
    tok = load_tokenizer(configs[8320].data.tokenizer)
    ids = torch.randint(0, 8200, (2, 17), generator=torch.Generator().manual_seed(0))
    model = build_model(configs[8320], Grid(), CPU)
    opt = build_optimizer(model, configs[8320], Grid(), CPU)
    model(ids[:, :-1], ids[:, 1:]).mean().backward()
    opt.step()

    def round_trip(model, opt, rows_to):
        cfg = configs[model.padded_vocab_size]
        state = {"train_state": {"step": 1}, "world": {"size": 1}}
        step_dir = ckpt.save_checkpoint(cfg.train.output_dir, 1, model, opt, Grid(), CPU, cfg, tok, state)
        model2, opt2 = fresh(configs[rows_to])
        ckpt.load_checkpoint(step_dir, model2, opt2, Grid(), CPU, configs[rows_to])
        return model2, opt2

    model2, opt2 = round_trip(model, opt, 8448)
    model3, opt3 = round_trip(model2, opt2, 8320)
    states = [optimizer_state(o, m) for o, m in ((opt, model), (opt2, model2), (opt3, model3))]
    for name, p in model.named_parameters():
        p2, p3 = model2.get_parameter(name), model3.get_parameter(name)
        pairs = [(p, p2, "weight")] + [(states[0][name][k], states[1][name][k], k)
                                       for k in ("exp_avg", "exp_avg_sq")]
        for a, b, what in pairs:
            if name in ckpt.VOCAB_PADDED:
                assert b.shape[0] == 8448 and torch.equal(b[:8200], a[:8200]), (name, what)
                assert not b[8200:].any(), (name, what)  # padding rows restart at zero
                assert a[:8200].abs().sum() > 0
            else:
                assert torch.equal(a, b), (name, what)
        assert torch.equal(p3[:8200], p[:8200]) and p3.shape == p.shape, name
