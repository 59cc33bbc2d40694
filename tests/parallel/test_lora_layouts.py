"""LoRA training under tensor parallelism (with and without sequence parallel) and data
parallelism equals the single-process run: per-step losses and gradient norms, and the trained
adapters, within 1e-6.

One 2-rank gloo world serves the module: TP 2 (x DP 1) or DP 2. tiny-sc1 (MQA: at TP 2 the KV
head, and so the adapter's kv rows, are copied on both ranks while the q rows split) and tiny-sc2
(2 KV heads: split at TP 2), cut down to 2 layers x 64, every projection adapted; DP 2 also with
the distributed optimizer (gradient buffer, frozen base outside it). Each preset's base model is
written once; adapter dropout is 0 there, and on in its own tests (TP 2 with and without sequence
parallel draws the masks one process draws; with attention dropout on, attention alone draws
per-rank masks).
"""

from __future__ import annotations

import math

import pytest
import torch

from starcoder.config import load_config
from starcoder.convert.lora import is_lora
from starcoder.finetune.lora import LoRADropout, apply_lora
from starcoder.models import GPT, init_weights
from starcoder.parallel import parallelize
from tests.distributed import World
from tests.models import write_tiny_model
from tests.parallel.common import grid, trained_parameters
from tests.parallel.test_training import assemble
from tests.training.helpers import make_corpus, metrics

MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
         "model.ffn_hidden_size=128"]
TARGETS = "finetune.lora_targets=[q_proj, kv_proj, out_proj, fc_in, fc_out]"
SETS = ["train.seq_length=32", "train.global_batch_size=8", "train.micro_batch_size=2",
        "train.max_steps=3", "train.warmup_steps=0", "train.lr=1e-2", "train.min_lr=0",
        "finetune.lora_rank=4", "finetune.lora_alpha=8", "finetune.lora_dropout=0",
        TARGETS,
        "log.every=1", "log.tensorboard=false", "log.progress_bar=false", "data.num_workers=0"]
LAYOUTS = {"tp2": ["parallel.tensor_parallel=2"],
           "tp2-sp": ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"],
           "dp2": [],
           "dp2-distopt": ["parallel.distributed_optimizer=true"]}
TOL = 1e-6

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world():
    with World(2) as w:
        yield w


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return make_corpus(tmp_path_factory.mktemp("corpus"), files=4)


def config(preset, base, corpus, out, *overrides):
    return load_config(preset, [*MODEL, *SETS, f"train.init_from={base}", f"data.paths=[{corpus}]",
                                f"train.output_dir={out}", *overrides])


def _train(preset, base, corpus, out, overrides):
    return trained_parameters(config(preset, base, corpus, out, *overrides))


@pytest.mark.parametrize("preset, layouts", [("tiny-sc1", ["tp2", "tp2-sp", "dp2"]),
                                             ("tiny-sc2", ["tp2-sp", "dp2-distopt"])])
def test_tp2_and_dp2_lora_runs_equal_one_process(preset, layouts, world, corpus, tmp_path):
    base = write_tiny_model(tmp_path / "base", preset, MODEL, std=0.05)["native"]
    reference = trained_parameters(config(preset, base, corpus, tmp_path / "one"))
    ref_metrics = metrics(tmp_path / "one")
    assert ref_metrics[-1]["loss"] < ref_metrics[0]["loss"]  # it does train
    for layout in layouts:
        per_rank = world.run(_train, preset, str(base), corpus, str(tmp_path / layout), LAYOUTS[layout])
        got = metrics(tmp_path / layout)
        for key in ("loss", "grad_norm"):
            assert all(math.isclose(a[key], b[key], rel_tol=TOL, abs_tol=TOL)
                       for a, b in zip(got, ref_metrics)) and len(got) == len(ref_metrics), \
                (layout, key, [(a[key], b[key]) for a, b in zip(got, ref_metrics)])
        trained = assemble(per_rank)
        adapters = [n for n in trained if is_lora(n)]
        assert adapters and set(adapters) == {n for n in reference if is_lora(n)}
        for name in adapters:
            assert not trained[name].isnan().any(), (layout, name)  # every element held somewhere
            assert torch.allclose(trained[name], reference[name][2], atol=TOL, rtol=0), \
                (layout, name, (trained[name] - reference[name][2]).abs().max())
        # Copies of one tensor on several ranks (replicated A or B, MQA's kv rows) stay identical.
        holders: dict = {}
        for params in per_rank:
            for name, (_, slices, tensor) in params.items():
                holders.setdefault((name, slices), []).append(tensor)
        for (name, _), copies in holders.items():
            assert all(torch.equal(copies[0], t) for t in copies[1:]), (layout, name)
        if layout.startswith("tp2"):
            shards = {name for (name, slices), c in holders.items() if len(c) == 1 and is_lora(name)}
            copied_kv = "blocks.0.attn.input_adapter.lora_B_kv" not in shards
            assert copied_kv == (preset == "tiny-sc1")  # MQA: kv rows on both ranks
            assert "blocks.0.attn.input_adapter.lora_B_q" in shards
            assert "blocks.0.mlp.fc_out.lora_A" in shards and "blocks.0.mlp.fc_out.lora_B" not in shards


@pytest.mark.parametrize("model_dropout, layouts", [
    ([], ["tp2", "tp2-sp"]),
    # replicated activations without sequence parallel: the model's dropouts match one process too
    (["model.hidden_dropout=0.1", "model.embedding_dropout=0.1"], ["tp2"])])
def test_tp2_lora_dropout_equals_one_process(model_dropout, layouts, world, corpus, tmp_path):
    """Adapter dropout on replicated inputs (q/kv, fc_in) and on column shards (out_proj, fc_out)
    draws one process's masks, so the losses and gradient norms match."""
    dropout = ["finetune.lora_dropout=0.1", *model_dropout]
    base = write_tiny_model(tmp_path / "base", "tiny-sc1", MODEL, std=0.05)["native"]
    trained_parameters(config("tiny-sc1", base, corpus, tmp_path / "one", *dropout))
    ref_metrics = metrics(tmp_path / "one")
    no_dropout = tmp_path / "no-dropout"
    trained_parameters(config("tiny-sc1", base, corpus, no_dropout))
    assert metrics(no_dropout)[-1]["loss"] != ref_metrics[-1]["loss"]  # the dropout acts
    for layout in layouts:
        world.run(_train, "tiny-sc1", str(base), corpus, str(tmp_path / layout), [*LAYOUTS[layout], *dropout])
        got = metrics(tmp_path / layout)
        for key in ("loss", "grad_norm"):
            assert all(math.isclose(a[key], b[key], rel_tol=TOL, abs_tol=TOL)
                       for a, b in zip(got, ref_metrics)) and len(got) == len(ref_metrics), \
                (layout, key, [(a[key], b[key]) for a, b in zip(got, ref_metrics)])


def _adapter_keep_masks(sequence_parallel: bool):
    """This rank's kept adapter inputs of block 0 in one training forward with attention dropout
    on: (tp rank, {adapter: keep mask})."""
    cfg = load_config("tiny-sc1", [*MODEL, "model.attention_dropout=0.5", "finetune.lora_rank=4",
                                   "finetune.lora_dropout=0.5", TARGETS, "train.init_from=unread",
                                   "parallel.tensor_parallel=2",
                                   f"parallel.sequence_parallel={str(sequence_parallel).lower()}"])
    g = grid(2, sequence_parallel)
    model = parallelize(GPT(cfg.model, padded_vocab_size=cfg.model.padded_vocab_size(2)), g)
    init_weights(model, cfg.model, seed=1)
    apply_lora(model, cfg, g)
    masks = {}

    def record(name):
        def hook(module, args, out):
            masks[name] = out != 0
        return hook

    for name, module in model.blocks["0"].named_modules():
        if isinstance(module, LoRADropout):
            module.register_forward_hook(record(name))
    torch.manual_seed(0)  # a trainer seeds every rank alike
    model.train()(torch.randint(0, cfg.model.vocab_size, (2, 32)))
    return g.tp_rank, masks


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_adapter_dropout_is_outside_the_attention_rng_fork(sequence_parallel, world):
    """Attention dropout draws per-rank masks for the rank's heads; the adapters around it do
    not: a replicated input gets one mask on both ranks, column shards different columns."""
    (_, rank0), (_, rank1) = sorted(world.run(_adapter_keep_masks, sequence_parallel), key=lambda o: o[0])
    assert set(rank0) == {"attn.input_adapter.dropout", "attn.out_proj.dropout", "mlp.fc_in.dropout",
                          "mlp.fc_out.dropout"}
    for name in ("attn.input_adapter.dropout", "mlp.fc_in.dropout"):
        assert torch.equal(rank0[name], rank1[name]), name
    for name in ("attn.out_proj.dropout", "mlp.fc_out.dropout"):
        assert not torch.equal(rank0[name], rank1[name]), name
