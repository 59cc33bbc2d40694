"""The training loop in one process: outputs, recomputation, non-finite steps, init_from and the
start-up errors that name their config key."""

import json
import math

import pytest
import torch
from transformers import Starcoder2Config, Starcoder2ForCausalLM

import starcoder
from starcoder.convert.weights import iter_weights
from starcoder.config import ConfigError
from starcoder.data import build_train_loader, load_tokenizer
from starcoder.models import gpt
from starcoder.models.gpt import GPT
from starcoder.models.init import init_weights
from starcoder.convert.checkpoints import latest_checkpoint
from starcoder.training.trainer import TrainingError, train
from tests.training.helpers import losses, metrics, tiny_config


pytestmark = pytest.mark.usefixtures("one_thread")


def test_loss_falls_and_the_run_writes_its_outputs(corpus, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(corpus, run, "train.max_steps=16", "train.eval_every=8", "train.eval_steps=2",
                      "train.save_every=8", "log.every=4", "log.tensorboard=true",
                      "data.split=75,25,0")
    state = train(cfg)
    assert state.step == 16 and state.consumed_samples == 16 * 8
    records = metrics(run)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [4, 8, 12, 16]
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0  # from ~9 down
    assert set(steps[0]) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu",
                             "consumed_samples", "mem_gib", "skipped_steps"}
    assert steps[0]["mfu"] is None and steps[0]["tokens_per_s"] > 0  # no peak on a CPU
    validation = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in validation] == [8, 16] and math.isfinite(validation[-1]["val_loss"])
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    step_dir = latest_checkpoint(run)
    assert step_dir.name == "step_0000016"
    assert {p.name for p in step_dir.iterdir()} == {"config.yaml", "trainer_state.json", "manifest.json",
                                                    "tokenizer.json", "dcp"}
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"latest", "step_0000008",
                                                                 "step_0000016"}
    # Starting again resumes the finished run: nothing to do, nothing rewritten.
    assert train(cfg).step == 16
    assert [r["step"] for r in metrics(run) if "loss" in r] == [4, 8, 12, 16]


def test_recomputation_gives_the_same_gradients_and_losses(corpus, tmp_path):
    cfg = tiny_config(corpus, tmp_path)
    ids = torch.randint(0, 1000, (2, 33), generator=torch.Generator().manual_seed(0))
    grads = {}
    for mode in ("none", "selective", "full"):
        cfg.model.recompute = mode
        model = GPT(cfg.model)
        init_weights(model, cfg.model, seed=3)
        model(ids[:, :-1], ids[:, 1:]).mean().backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters()}
    for mode in ("selective", "full"):
        for name, grad in grads["none"].items():
            assert torch.allclose(grads[mode][name], grad, rtol=0, atol=1e-7), (mode, name)

    runs = {}
    for mode, sets in (("none", ()), ("selective", ()), ("full", ()), ("full-1", ("model.recompute_layers=1",))):
        run = tmp_path / mode
        train(tiny_config(corpus, run, f"model.recompute={mode.split('-')[0]}", *sets, "train.max_steps=3"))
        runs[mode] = [x for r in metrics(run) for x in (r["loss"], r["grad_norm"])]
    for mode in ("selective", "full", "full-1"):
        assert runs[mode] == pytest.approx(runs["none"], abs=1e-6), mode


def test_non_finite_steps_are_skipped_then_stop_the_run(corpus, tmp_path, monkeypatch):
    """Steps 2 and 4 produce a NaN loss: step 2 is skipped (weights and Adam state untouched),
    and the second skip exceeds train.max_nonfinite_steps=1."""
    calls = {"n": 0}
    real = gpt.OutputLayer.forward

    def poisoned(self, h, weight, labels=None):
        out = real(self, h, weight, labels)
        calls["n"] += 1  # two micro-batches per step: calls 3-4 are step 2, 7-8 step 4
        return out * float("nan") if calls["n"] in (3, 7) else out

    monkeypatch.setattr(gpt.OutputLayer, "forward", poisoned)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match="max_nonfinite_steps"):
        train(tiny_config(corpus, run, "train.max_steps=6", "train.save_every=1",
                          "train.max_nonfinite_steps=1"))
    records = metrics(run)
    assert [r["skipped_steps"] for r in records] == [0, 1, 1]
    assert records[1]["loss"] is None and math.isfinite(records[2]["loss"])
    weights = {s: dict(iter_weights(run / f"checkpoints/step_000000{s}")[1])
               for s in (1, 2, 3)}
    assert all(torch.equal(weights[1][n], weights[2][n]) for n in weights[1])
    assert not torch.equal(weights[2]["blocks.0.mlp.fc_in.weight"], weights[3]["blocks.0.mlp.fc_in.weight"])
    assert (run / "checkpoints/latest").read_text().strip() == "step_0000003"


def first_batch_loss(cfg, model_fn) -> float:
    """Token-mean loss of `model_fn(input_ids) -> logits` over the run's first global batch."""
    tok = load_tokenizer(cfg.data.tokenizer)
    loader = build_train_loader(cfg, tok, dp_rank=0, dp_size=1, consumed_samples=0)
    total = count = 0.0
    for _ in range(cfg.train.global_batch_size // cfg.train.micro_batch_size):
        mb = next(loader)
        tokens, mask = mb["tokens"], mb["loss_mask"]
        with torch.no_grad():
            logits = model_fn(tokens[:, :-1]).float()
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
        total += float((ce * mask).sum())
        count += float(mask.sum())
    return total / count


def test_init_from_a_hugging_face_model_continues_with_its_loss(corpus, tmp_path):
    cfg = tiny_config(corpus, tmp_path / "run", f"train.init_from={tmp_path / 'hf'}", "train.max_steps=1")
    m = cfg.model
    torch.manual_seed(0)
    hf = Starcoder2ForCausalLM(Starcoder2Config(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups, max_position_embeddings=m.max_position_embeddings,
        sliding_window=m.sliding_window, rope_theta=m.rope_theta, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.02)
    hf.save_pretrained(tmp_path / "hf")
    expected = first_batch_loss(cfg, lambda ids: hf(ids).logits)
    train(cfg)
    assert losses(tmp_path / "run")[0] == pytest.approx(expected, abs=1e-5)
    assert expected < 9.5  # a real loss of an untrained model over 8192 tokens (ln 8192 = 9.01)

    # ... and from a training run folder (its latest step).
    cfg2 = tiny_config(corpus, tmp_path / "run2", f"train.init_from={tmp_path / 'run'}", "train.max_steps=1")
    trained = starcoder.load_model(tmp_path / "run")
    expected = first_batch_loss(cfg2, trained)
    train(cfg2)
    assert losses(tmp_path / "run2")[0] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("override, key", [
    ("parallel.tensor_parallel=2", "parallel.tensor_parallel"),
    ("parallel.pipeline_parallel=2", "parallel.pipeline_parallel"),
    ("data.tokenizer=/no/such/tokenizer.json", "data.tokenizer"),
    ("model.vocab_size=1000", "model.vocab_size"),
    ("data.paths=[]", "data.paths"),
])
def test_start_up_errors_name_the_key(corpus, tmp_path, override, key):
    with pytest.raises(ConfigError, match=f"^{key}:"):
        train(tiny_config(corpus, tmp_path, override))


def test_wandb_asked_for_but_not_installed_names_the_key(corpus, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="^log.wandb:"):
        train(tiny_config(corpus, tmp_path, "log.wandb=true"))


def test_resuming_with_another_model_names_the_differing_key(corpus, tmp_path):
    train(tiny_config(corpus, tmp_path, "train.max_steps=1"))
    with pytest.raises(ConfigError, match="^model.ffn_hidden_size:"):
        train(tiny_config(corpus, tmp_path, "train.max_steps=2", "model.ffn_hidden_size=256"))


def test_wandb_logs_offline_without_a_key(corpus, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(tiny_config(corpus, tmp_path, "train.max_steps=2", "log.every=1", "log.wandb=true"))
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_profile_steps_write_a_trace(corpus, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(corpus, run, "train.max_steps=3", "train.profile_steps=[2, 3]"))
    (trace,) = (run / "profile").iterdir()
    assert trace.name == "steps_2-3_rank0.trace.json"
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name", "").startswith("aten::mm") for e in events)
