"""Optimizer, schedule, gradient norm and loss scaling: the pieces of one step, without data."""

import pytest
import torch

from starcoder.config import load_config
from starcoder.models.gpt import GPT
from starcoder.models.init import init_weights
from starcoder.parallel.grid import Grid
from starcoder.training.optimizer import build_optimizer, optimizer_state, param_groups
from starcoder.training.precision import LossScaler, resolve_precision
from starcoder.training.schedule import lr_at

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=128", "train.seq_length=32"]


def tiny_model(cfg):
    model = GPT(cfg.model)
    init_weights(model, cfg.model, seed=1)
    return model


def test_warmup_then_cosine_to_min_lr():
    t = load_config("tiny-sc2", ["train.lr=1.0", "train.min_lr=0.1", "train.warmup_steps=10",
                                 "train.max_steps=110"]).train
    assert lr_at(1, t) == pytest.approx(0.1)
    assert lr_at(10, t) == pytest.approx(1.0)
    assert lr_at(60, t) == pytest.approx(0.55)  # halfway: min + (max - min) / 2
    assert lr_at(110, t) == pytest.approx(0.1)
    assert lr_at(500, t) == pytest.approx(0.1)  # held after decay ends
    steps = [lr_at(s, t) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))


def test_linear_constant_and_explicit_decay_steps():
    base = ["train.lr=1.0", "train.min_lr=0.0", "train.warmup_steps=0", "train.max_steps=100"]
    linear = load_config("tiny-sc2", base + ["train.lr_schedule=linear"]).train
    assert lr_at(25, linear) == pytest.approx(0.75)
    constant = load_config("tiny-sc2", base + ["train.lr_schedule=constant"]).train
    assert lr_at(1, constant) == lr_at(99, constant) == 1.0
    # decay steps independent of max_steps, so extending a run keeps the curve
    decay = load_config("tiny-sc2", base + ["train.lr_schedule=linear", "train.lr_decay_steps=50"]).train
    assert lr_at(25, decay) == pytest.approx(0.5) and lr_at(80, decay) == 0.0


def test_no_weight_decay_on_biases_and_norms():
    cfg = load_config("tiny-sc2", TINY)
    model = tiny_model(cfg)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} == {
        n for n, p in model.named_parameters() if n.endswith("bias") or "norm" in n}
    assert "embedding.word.weight" in {names[id(p)] for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_adamw_hyperparameters_follow_the_config():
    cfg = load_config("tiny-sc2", TINY + ["train.adam_beta2=0.95", "train.adam_eps=1e-8"])
    opt = build_optimizer(tiny_model(cfg), cfg, Grid(), torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert group["betas"] == (0.9, 0.95) and group["eps"] == 1e-8 and not group["fused"]


def test_optimizer_state_is_created_without_changing_weights():
    cfg = load_config("tiny-sc2", TINY)
    model = tiny_model(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, cfg, Grid(), torch.device("cpu"))
    state = optimizer_state(opt, model)
    assert set(state) == set(before)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    assert all(not s["exp_avg"].any() and s["exp_avg"].shape == before[n].shape for n, s in state.items())


def test_loss_scaler_backs_off_on_overflow_and_grows_after_clean_steps():
    t = load_config("tiny-sc2", ["train.precision=fp16", "train.initial_loss_scale=1024"]).train
    scaler = LossScaler.for_precision("fp16", t)
    scaler.growth_interval = 3
    scaler.update(False)
    assert scaler.scale == 512
    for _ in range(3):
        scaler.update(True)
    assert scaler.scale == 1024
    restored = LossScaler.for_precision("fp16", t)
    restored.load_state_dict(scaler.state_dict())
    assert restored.scale == 1024
    fp32 = LossScaler.for_precision("fp32", t)
    fp32.update(False)
    assert fp32.scale == 1.0


def test_precision_defaults_to_fp32_on_cpu():
    t = load_config("tiny-sc2").train
    assert resolve_precision(t, torch.device("cpu")) == "fp32"
    assert resolve_precision(t, torch.device("cuda")) == "bf16"
