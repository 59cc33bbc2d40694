"""LoRA: adapters against peft, merged export, frozen base, optimizer state, resume.

One LoRA run per family (tiny-sc1: GPTBigCode, MQA; tiny-sc2: Starcoder2, GQA) starts from the
session's tiny models and trains two steps at a high learning rate, so the adapters move far from
zero (B starts at zero: an untrained adapter would make the comparisons vacuous).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from starcoder.cli import main as starcoder_main
from starcoder.config import ConfigError, UserError, load_config
from starcoder.convert.checkpoints import CheckpointReader, latest_checkpoint
from starcoder.convert.export import adapter_to_peft, to_hf
from starcoder.convert.lora import is_lora, lora_shapes
from starcoder.finetune.lora import adapters_off, apply_lora
from starcoder.generation.load import load_generator
from starcoder.models.gpt import GPT
from tests.training.helpers import losses, make_corpus, run_trainer

peft = pytest.importorskip("peft")

TOL = 1e-4
TARGETS = {"sc1": "[q_proj, kv_proj, out_proj, fc_out]",  # Astraios: c_attn, attn/mlp c_proj
           "sc2": "[q_proj, kv_proj, out_proj, fc_in, fc_out]"}
PRESETS = {"sc1": "tiny-sc1", "sc2": "tiny-sc2"}

pytestmark = pytest.mark.usefixtures("one_thread")


def lora_config(family, base, corpus, out, *overrides):
    return load_config(PRESETS[family], [
        "finetune.lora_rank=8", "finetune.lora_alpha=16", "finetune.lora_dropout=0.05",
        f"finetune.lora_targets={TARGETS[family]}", f"train.init_from={base}",
        f"data.paths=[{corpus}]", f"train.output_dir={out}", "train.seq_length=32",
        "train.global_batch_size=2", "train.micro_batch_size=2", "train.max_steps=2",
        "train.lr=0.05", "train.min_lr=0", "train.warmup_steps=0", "train.weight_decay=0",
        "log.every=1", "log.tensorboard=false", "log.progress_bar=false", "data.num_workers=0",
        *overrides])


def run(cfg) -> torch.nn.Module:
    return run_trainer(cfg).model.eval()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return make_corpus(tmp_path_factory.mktemp("corpus"), files=4)


@pytest.fixture(scope="module", params=sorted(PRESETS))
def lora_run(request, tiny_models, corpus, tmp_path_factory):
    family = request.param
    out = tmp_path_factory.mktemp(f"lora-{family}")
    model = run(lora_config(family, tiny_models[family]["native"], corpus, out))
    return {"family": family, "dir": out, "model": model, "base": tiny_models[family]}


def ids() -> torch.Tensor:
    return torch.randint(0, 8192, (2, 24), generator=torch.Generator().manual_seed(3))


def test_peft_adapter_on_the_exported_base_gives_our_logits(lora_run, tmp_path):
    with torch.no_grad():
        ours = lora_run["model"](ids())
        base = AutoModelForCausalLM.from_pretrained(lora_run["base"]["hf"], dtype=torch.float32)
        plain = base(ids()).logits
        adapter = tmp_path / "adapter"
        assert starcoder_main(["convert", "to-hf", "--checkpoint", str(lora_run["dir"]),
                               "--output", str(adapter), "--adapter-only"]) == 0
        peft_model = peft.PeftModel.from_pretrained(base, adapter).eval()
        theirs = peft_model(ids()).logits
    assert (ours - plain).abs().max() > 100 * TOL  # the adapters matter
    assert torch.allclose(ours, theirs, atol=TOL, rtol=0), (ours - theirs).abs().max()
    config = json.loads((adapter / "adapter_config.json").read_text())
    expected = {"sc1": ["attn.c_attn", "attn.c_proj", "mlp.c_proj"],
                "sc2": ["mlp.c_fc", "mlp.c_proj", "self_attn.k_proj", "self_attn.o_proj",
                        "self_attn.q_proj", "self_attn.v_proj"]}[lora_run["family"]]
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (8, 16.0, expected)


def test_merged_export_and_load_model_give_our_logits(lora_run, tmp_path):
    with torch.no_grad():
        ours = lora_run["model"](ids())
        merged = AutoModelForCausalLM.from_pretrained(to_hf(lora_run["dir"], tmp_path / "hf"),
                                                      dtype=torch.float32).eval()
        theirs = merged(ids()).logits
        again = load_generator(lora_run["dir"]).model(ids())  # the checkpoint read merged

    assert torch.allclose(ours, theirs, atol=TOL, rtol=0), (ours - theirs).abs().max()
    assert torch.allclose(ours, again, atol=TOL, rtol=0), (ours - again).abs().max()


def test_only_adapters_train_and_hold_optimizer_state(lora_run):
    model = lora_run["model"]
    ref = dict(load_generator(lora_run["base"]["native"]).model.named_parameters())
    for name, p in model.named_parameters():
        assert p.requires_grad == is_lora(name), name
        if not is_lora(name):
            rows = ref[name].shape[0]
            assert torch.equal(p[:rows], ref[name]), name  # the base did not move
    assert set(ref) == {n for n, _ in model.named_parameters() if not is_lora(n)}
    step = latest_checkpoint(lora_run["dir"])
    keys = CheckpointReader(step / "dcp").read_metadata().state_dict_metadata
    optim = {k.split(".exp_avg")[0].removeprefix("optim.") for k in keys if k.endswith(".exp_avg")}
    assert optim and optim == {n for n, _ in model.named_parameters() if is_lora(n)}


def test_a_resumed_lora_run_logs_the_same_losses(tiny_models, corpus, tmp_path):
    cfg = lora_config("sc2", tiny_models["sc2"]["native"], corpus, tmp_path / "whole",
                      "train.max_steps=4", "train.save_every=2", "train.lr=3e-3")
    run(cfg)
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    (tmp_path / "resumed/checkpoints/latest").write_text("step_0000002\n")
    shutil.rmtree(tmp_path / "resumed/checkpoints/step_0000004")
    run(lora_config("sc2", tiny_models["sc2"]["native"], corpus, tmp_path / "resumed",
                    "train.max_steps=4", "train.save_every=2", "train.lr=3e-3"))
    assert losses(tmp_path / "resumed")[-2:] == losses(tmp_path / "whole")[-2:]


def test_adapter_names_and_shapes_are_the_export_table():
    cfg = load_config("tiny-sc2", ["finetune.lora_rank=4", "train.init_from=x",
                                   "finetune.lora_targets=[q_proj, out_proj, fc_in]"])
    model = apply_lora(GPT(cfg.model), cfg)
    adapters = {n: tuple(p.shape) for n, p in model.named_parameters() if is_lora(n)}
    assert adapters == lora_shapes(cfg)
    assert "blocks.0.attn.input_adapter.lora_B_kv" not in adapters


@pytest.mark.parametrize("sets, message", [
    (["finetune.lora_rank=8"], "finetune.lora_rank: LoRA adapts a trained model"),
    (["finetune.lora_rank=8", "train.init_from=x", "finetune.lora_targets=[c_attn]"],
     "finetune.lora_targets: 'c_attn' is not one of"),
    (["finetune.lora_rank=-1"], "finetune.lora_rank: must be at least 0"),
    (["finetune.lora_dropout=1.0"], "finetune.lora_dropout: must be in [0, 1)"),
])
def test_bad_lora_settings_name_the_key(sets, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config("tiny-sc2", sets)


def test_adapter_only_needs_a_lora_checkpoint(tiny_models, tmp_path):
    with pytest.raises(UserError, match="--adapter-only exports a LoRA run's checkpoint"):
        adapter_to_peft(tiny_models["sc1"]["native"], tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_adapters_off_gives_the_base_model():
    cfg = load_config("tiny-sc1", ["finetune.lora_rank=4", "train.init_from=x",
                                   "finetune.lora_targets=[q_proj, kv_proj, out_proj, fc_in, fc_out]"])
    base = GPT(cfg.model).eval()
    model = GPT(cfg.model).eval()
    model.load_state_dict(base.state_dict())
    apply_lora(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_lora(name):
                p.normal_(0, 0.5)
        plain = base(ids())
        assert (model(ids()) - plain).abs().max() > 1e-2
        with adapters_off(model):
            assert torch.allclose(model(ids()), plain, atol=TOL, rtol=0)  # bias added apart
        assert (model(ids()) - plain).abs().max() > 1e-2  # back on after the block
