"""DPO: the trainer's loss and metrics against an independent float64 computation from
`transformers`, DPO+LoRA against an explicit frozen copy, and what the config refuses.

The independent check trains two steps from the session's tiny-sc2 (save after each): the
policy of step 2 is the step-1 checkpoint, exported to Hugging Face; the reference is the
exported initial model. transformers' logits in float64 give each sequence's summed log-prob
under the loss mask, and the DPO formula on them must give step 2's logged loss and metrics, and
on the held-out pairs (the last quarter, `data.split` 75,25,0) the validation of steps 1 and 2.
"""

from __future__ import annotations

import math
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from starcoder.config import ConfigError, load_config
from starcoder.convert.checkpoints import latest_checkpoint, read_manifest
from starcoder.convert.export import to_hf
from starcoder.convert.weights import load_weights
from starcoder.data import build_train_loader, build_valid_loader, load_tokenizer
from starcoder.finetune.dpo import METRICS
from starcoder.models.gpt import GPT
from starcoder.training.signals import StopRequest
from starcoder.training.trainer import Trainer
from tests.training.helpers import (checksummed_files, corrupt_copy, make_preference_corpus, metrics,
                                    run_trainer as run)

REL = 1e-5
BETA, SMOOTHING = 0.1, 0.1
HELD_OUT = ["data.split=75,25,0", "train.eval_every=1", "train.eval_steps=1"]
VAL_KEYS = ("val_loss", *(f"val_{name}" for name in METRICS))

pytestmark = pytest.mark.usefixtures("one_thread")


def dpo_config(base, corpus, out, *overrides):
    return load_config("tiny-sc2", [
        "train.objective=dpo", f"finetune.dpo_beta={BETA}", f"train.init_from={base}",
        f"data.paths=[{corpus}]", f"train.output_dir={out}", "train.seq_length=32",
        "train.global_batch_size=4", "train.micro_batch_size=2", "train.max_steps=2",
        "train.lr=5e-2", "train.min_lr=0", "train.warmup_steps=0", "train.weight_decay=0",
        "data.fim_rate=0", "data.split=100,0,0", "model.hidden_dropout=0.1",
        "log.every=1", "log.tensorboard=false", "log.progress_bar=false", "data.num_workers=0",
        *overrides])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return make_preference_corpus(tmp_path_factory.mktemp("prefs"))


def hf_logps(folder, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probs of each row under the mask, from transformers in float64."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    with torch.no_grad():
        logits = model(input_ids=tokens[:, :-1]).logits
    token = torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None])[..., 0]
    return (token * mask.double()).sum(1)


def formula(pi: torch.Tensor, ref: torch.Tensor) -> dict:
    """The mean loss and `METRICS` from float64 sequence log-probs (chosen rows even)."""
    d = (pi[0::2] - ref[0::2]) - (pi[1::2] - ref[1::2])
    assert (d.abs() > 0.1).all()  # the policy has moved: rewards are not trivially zero
    loss = (-(1 - SMOOTHING) * F.logsigmoid(BETA * d) - SMOOTHING * F.logsigmoid(-BETA * d)).mean()
    chosen, rejected = BETA * (pi[0::2] - ref[0::2]), BETA * (pi[1::2] - ref[1::2])
    values = [loss, chosen.mean(), rejected.mean(), (chosen > rejected).double().mean(),
              (chosen - rejected).mean(), pi[0::2].mean(), pi[1::2].mean()]
    return dict(zip(["loss", *METRICS], (v.item() for v in values)))


def assert_logged(logged: dict, expected: dict, pi: torch.Tensor, prefix: str = "") -> None:
    # Rewards are differences of summed log-probs (about -50 here) that our fp32 forward knows
    # to about 3e-7 relative (measured: 1.5e-6 absolute in a reward of 0.07): relative to the
    # log-probs they get the same 1e-5, as an absolute bound REL x beta x |log-prob|.
    scale = BETA * pi.abs().max().item()
    for name, value in expected.items():
        tol = REL * scale if name.startswith("rewards/") else 0.0
        got = logged[prefix + name]
        assert math.isclose(got, value, rel_tol=REL, abs_tol=tol), (prefix + name, got, value)


def test_loss_metrics_and_validation_equal_the_formula_on_transformers_logps(tiny_models, corpus,
                                                                            tmp_path):
    base = tiny_models["sc2"]
    cfg = dpo_config(base["native"], corpus, tmp_path / "run", "train.save_every=1",
                     f"finetune.dpo_label_smoothing={SMOOTHING}", *HELD_OUT)
    trainer = run(cfg)
    assert trainer.cfg.model.hidden_dropout == 0.0  # dropout off under DPO
    records = metrics(tmp_path / "run")
    logged = [r for r in records if "lr" in r][1]
    assert logged["step"] == 2
    policies = {step: to_hf(tmp_path / f"run/checkpoints/step_{step:07d}",
                            tmp_path / f"policy{step}") for step in (1, 2)}
    tokenizer = load_tokenizer(cfg.data.tokenizer)

    loader = build_train_loader(cfg, tokenizer, dp_rank=0, dp_size=1,
                                consumed_samples=cfg.train.global_batch_size)  # step 2's pairs
    train = [next(loader) for _ in range(2)]
    assert all(mb["tokens"].shape[0] == 4 for mb in train)  # 2 pairs: chosen, rejected rows
    valid = list(build_valid_loader(cfg, tokenizer, dp_rank=0, dp_size=1))  # the held-out pairs
    tokens = torch.cat([mb["tokens"] for mb in train + valid])
    mask = torch.cat([mb["loss_mask"] for mb in train + valid])
    prompts = sorted(tokenizer.decode(row.tolist()).split("\n")[0] for row in tokens[8::2])
    assert prompts == [f"Q: Go on {i}" for i in range(12, 16)]  # exactly the last 4 of 16
    ref = hf_logps(base["hf"], tokens, mask)
    pi = {step: hf_logps(folder, tokens, mask) for step, folder in policies.items()}
    assert_logged(logged, formula(pi[1][:8], ref[:8]), pi[1][:8])

    # Validation after step s scores the held-out pairs with the policy of step s.
    validation = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in validation] == [1, 2] and set(validation[0]) == {"step", *VAL_KEYS}
    for record in validation:
        policy = pi[record["step"]][8:]
        assert_logged(record, formula(policy, ref[8:]), policy, prefix="val_")


def test_validation_pairs_never_appear_in_training_batches(corpus, tmp_path):
    cfg = dpo_config("base", corpus, tmp_path, "train.max_steps=9", *HELD_OUT)  # 3 epochs of 12
    tokenizer = load_tokenizer(cfg.data.tokenizer)

    def rows(loader) -> list[tuple]:
        return [tuple(row.tolist()) for mb in loader for row in mb["tokens"]]

    train, valid = [], []
    for rank in (0, 1):
        loader = build_train_loader(cfg, tokenizer, dp_rank=rank, dp_size=2, consumed_samples=0)
        train += rows(next(loader) for _ in range(9 * 4 // 2 // 2))
        valid += rows(build_valid_loader(cfg, tokenizer, dp_rank=rank, dp_size=2))
    assert len(set(train)) == 24 and len(set(valid)) == 8  # 12 and 4 pairs, each row seen
    assert not set(train) & set(valid)
    prompts = {tokenizer.decode(list(row)).split("\n")[0] for row in valid}
    assert prompts == {f"Q: Go on {i}" for i in range(12, 16)}


def test_precomputed_reference_gives_the_frozen_run(tiny_models, corpus, tmp_path):
    runs = {}
    for ref in ("frozen", "precomputed"):
        # Every step sees all 12 training pairs, so the loss can only fall by learning them;
        # validation (after step 3) reads each of the 4 held-out pairs 3 times.
        run(dpo_config(tiny_models["sc2"]["native"], corpus, tmp_path / ref, "train.max_steps=3",
                       "train.global_batch_size=12", "train.micro_batch_size=4", "train.lr=1e-3",
                       "train.lr_schedule=constant", f"finetune.dpo_reference={ref}", *HELD_OUT,
                       "train.eval_every=3"))
        runs[ref] = metrics(tmp_path / ref)
    train = [r for r in runs["frozen"] if "lr" in r]
    assert train[-1]["loss"] < train[0]["loss"]  # it learns the preference
    assert len(runs["frozen"]) == len(runs["precomputed"]) == 4  # 3 steps, 1 validation
    for a, b in zip(runs["frozen"], runs["precomputed"]):
        assert a.keys() == b.keys()
        for key in ("loss", "grad_norm", *METRICS) if "lr" in a else VAL_KEYS:
            assert math.isclose(a[key], b[key], rel_tol=1e-6, abs_tol=1e-6), (key, a[key], b[key])


def test_lora_reference_equals_an_explicit_frozen_copy(tiny_models, corpus, tmp_path):
    native = tiny_models["sc2"]["native"]
    cfg = dpo_config(native, corpus, tmp_path / "lora", "finetune.lora_rank=8",
                     "finetune.lora_alpha=16", "finetune.lora_dropout=0.05")
    trainer = run(cfg)  # two steps: the adapters are no longer zero
    model, dpo = trainer.model, trainer.dpo
    assert dpo.reference is None  # the base under adapters_off: no second copy
    loader = build_train_loader(trainer.cfg, trainer.tokenizer, dp_rank=0, dp_size=1,
                                consumed_samples=8)
    mb = next(loader)
    tokens, mask = mb["tokens"], mb["loss_mask"]

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = dpo.loss_sum(model(tokens[:, :-1], tokens[:, 1:]), mb, tokens, mask)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    with_lora = loss_and_grads()
    copy = GPT(trainer.cfg.model)  # the base model alone, loaded again
    load_weights(copy, native, trainer.grid)
    dpo.reference = copy.eval().requires_grad_(False)
    with_copy = loss_and_grads()
    assert with_lora[0] != pytest.approx(math.log(2) * 2, abs=1e-4)  # the policy differs from the base
    assert math.isclose(with_lora[0], with_copy[0], rel_tol=1e-6), (with_lora[0], with_copy[0])
    assert with_lora[1].keys() == with_copy[1].keys() and with_lora[1]
    for name, grad in with_lora[1].items():
        assert grad.abs().max() > 0, name
        assert torch.allclose(grad, with_copy[1][name], rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("sets, key", [
    (["data.pack=true"], "data.pack"),
    (["parallel.pipeline_parallel=2", "model.num_layers=2"], "parallel.pipeline_parallel"),
    (["finetune.dpo_beta=0"], "finetune.dpo_beta"),
    (["finetune.dpo_label_smoothing=0.5"], "finetune.dpo_label_smoothing"),
    (["finetune.dpo_reference=copy"], "finetune.dpo_reference"),
])
def test_config_refuses(sets, key, tmp_path):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        dpo_config("base", "corpus", tmp_path, *sets)


def test_preference_data_needs_dpo_and_dpo_needs_it(tiny_models, corpus, tmp_path):
    from tests.training.helpers import make_sft_corpus

    with pytest.raises(ConfigError, match=r"data\.paths\[0\].*only train\.objective dpo"):
        Trainer(dpo_config(tiny_models["sc2"]["native"], corpus, tmp_path / "a",
                           "train.objective=sft")).run(StopRequest())
    sft = make_sft_corpus(tmp_path / "sft", pairs=4)
    with pytest.raises(ConfigError, match=r"data\.paths\[0\].*not preference data"):
        Trainer(dpo_config(tiny_models["sc2"]["native"], sft, tmp_path / "b")).run(StopRequest())


def test_a_resumed_run_recomputes_the_reference_and_logs_the_same(tiny_models, corpus, tmp_path):
    native = tiny_models["sc2"]["native"]
    sets = ("train.max_steps=4", "train.save_every=2", "train.lr=1e-3",
            "finetune.dpo_reference=precomputed")
    run(dpo_config(native, corpus, tmp_path / "whole", *sets))
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    (tmp_path / "resumed/checkpoints/latest").write_text("step_0000002\n")
    shutil.rmtree(tmp_path / "resumed/checkpoints/step_0000004")
    run(dpo_config(native, corpus, tmp_path / "resumed", *sets))  # the policy is not the reference
    whole, resumed = metrics(tmp_path / "whole"), metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(whole[2:], resumed[2:]):
        for key in ("loss", *METRICS):
            assert a[key] == b[key], (key, a[key], b[key])


def test_epochs_count_pairs(corpus, tmp_path):
    from starcoder.data import resolve_epochs

    cfg = dpo_config("base", corpus, tmp_path, "train.epochs=2")
    assert resolve_epochs(cfg).train.max_steps == 2 * 16 // 4  # 16 pairs, 4 a step


def test_a_step_folder_is_checksummed_once_per_run_for_policy_and_reference(tiny_models, corpus,
                                                                            tmp_path):
    one_step = ("train.max_steps=1", "train.save_every=1")
    run(dpo_config(tiny_models["sc2"]["native"], corpus, tmp_path / "first", *one_step))
    step = latest_checkpoint(tmp_path / "first")
    with checksummed_files(step) as read:
        trainer = run(dpo_config(step, corpus, tmp_path / "second", *one_step))
    assert trainer.dpo.reference is not None  # the frozen copy: a second load of the step folder
    assert sorted(read) == sorted(read_manifest(step)["files"])  # each file once, not twice

    corrupt = corrupt_copy(step, tmp_path / "corrupt")
    refused = rf"^train\.init_from: {re.escape(str(corrupt))}: corrupt checkpoint: "
    with pytest.raises(ConfigError, match=refused):
        run(dpo_config(corrupt, corpus, tmp_path / "third", *one_step))
    # A resume loads no policy from init_from: the reference's load verifies the folder itself.
    with pytest.raises(ConfigError, match=refused):
        run(dpo_config(corrupt, corpus, tmp_path / "second", "train.max_steps=2"))
