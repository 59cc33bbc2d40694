"""Activation recomputation (starcoder.models.recompute): how often attention and the GEMMs run
per training step under each mode, counted at the dispatcher; `model.recompute_layers`."""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from starcoder.config import ConfigError, load_config
from starcoder.models import GPT, init_weights, recompute

ATTENTION = ("aten::_scaled_dot_product_flash_attention_for_cpu", "starcoder::flash_attention_forward")
GEMMS = ("aten::mm", "aten::addmm")


class OpCounter(TorchDispatchMode):
    """Counts the operators that actually run (a selective checkpoint's saved ones do not rerun)."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func._schema.name] += 1
        return func(*args, **(kwargs or {}))

    def count(self, names) -> int:
        return sum(self.ops[n] for n in names)


def model(preset: str, *overrides: str) -> GPT:
    cfg = load_config(preset, ["model.num_layers=3", "train.seq_length=32", *overrides])
    gpt = GPT(cfg.model).train()
    init_weights(gpt, cfg.model, seed=3)
    return gpt


def step(gpt: GPT) -> tuple[OpCounter, torch.Tensor]:
    """Ops of one forward and backward, and the gradients."""
    ids = torch.randint(0, 8192, (2, 33), generator=torch.Generator().manual_seed(0))
    with OpCounter() as ops:
        gpt(ids[:, :-1], ids[:, 1:]).mean().backward()
    return ops, torch.cat([p.grad.flatten() for p in gpt.parameters()])


@pytest.mark.parametrize("preset", ["tiny-sc1", "tiny-sc2"])
def test_selective_runs_attention_and_the_gemms_once_full_runs_the_block_twice(preset):
    counts, grads = {}, {}
    for mode in ("none", "selective", "full"):
        ops, grads[mode] = step(model(preset, f"model.recompute={mode}"))
        counts[mode] = (ops.count(ATTENTION), ops.count(GEMMS), ops.ops["aten::native_layer_norm"])
    layers = 3
    assert counts["none"][0] == counts["selective"][0] == layers  # attention forwards per step
    assert counts["full"][0] == 2 * layers
    assert counts["selective"][1] == counts["none"][1]  # no GEMM runs again
    assert counts["full"][1] > counts["none"][1]
    # ... while the LayerNorms are recomputed (2 per block, the final one is outside the blocks)
    assert counts["selective"][2] == counts["none"][2] + 2 * layers
    for mode in ("selective", "full"):
        assert torch.equal(grads[mode], grads["none"]), mode


def test_selective_keeps_the_triton_flash_attention_output():
    """The Triton kernel's custom op (interpreter) is saved too; only attention takes Triton here,
    which keeps the interpreter's share small."""
    runs = {}
    for mode in ("selective", "full"):
        cfg = load_config("tiny-sc1", ["train.seq_length=16", "model.hidden_size=64",
                                       "model.ffn_hidden_size=128", "model.num_attention_heads=4"])
        gpt = GPT(cfg.model).train()
        gpt.set_kernels("torch")
        block = gpt.blocks["0"]
        block.attn.backend = "triton"
        x = torch.randn(2, 16, 64, requires_grad=True)
        with OpCounter() as ops:
            recompute.run_block(block, x, None, mode).sum().backward()
        runs[mode] = ops.ops["starcoder::flash_attention_forward"]
    assert runs == {"selective": 1, "full": 2}


def test_recompute_layers_recomputes_the_first_blocks_of_each_chunk():
    assert recompute.block_modes("full", 2, 3) == ["full", "full", "none"]
    assert recompute.block_modes("full", 5, 3) == ["full"] * 3
    assert recompute.block_modes("full", None, 2) == ["full"] * 2
    assert recompute.block_modes("selective", None, 2) == ["selective"] * 2
    ops, grads = step(model("tiny-sc2", "model.recompute=full", "model.recompute_layers=1"))
    assert ops.count(ATTENTION) == 3 + 1
    _, plain = step(model("tiny-sc2"))
    assert torch.equal(grads, plain)
    # A chunk (a pipeline stage's blocks, keyed by global index) counts from its own first block.
    gpt = model("tiny-sc2", "model.recompute=full", "model.recompute_layers=1")
    chunk = torch.nn.ModuleDict({k: gpt.blocks[k] for k in ("1", "2")})
    x = torch.randn(2, 32, 256, requires_grad=True)
    with OpCounter() as ops:
        recompute.run_blocks(chunk, x, gpt._rope(32, x.device), gpt.cfg, training=True).sum().backward()
    assert ops.count(ATTENTION) == 2 + 1


@pytest.mark.parametrize("overrides, message", [
    (["model.recompute=full", "model.recompute_layers=-1"],
     "model.recompute_layers: must be in [0, model.num_layers (4)] or null, got -1"),
    (["model.recompute=full", "model.recompute_layers=5"],
     "model.recompute_layers: must be in [0, model.num_layers (4)] or null, got 5"),
    (["model.recompute=selective", "model.recompute_layers=2"],
     "model.recompute_layers: applies to model.recompute: full only (got selective)"),
    (["model.recompute=selective", "parallel.pipeline_parallel=2", "parallel.pipeline_schedule=zero_bubble"],
     "model.recompute: selective cannot run under parallel.pipeline_schedule: zero_bubble"),
])
def test_recompute_settings_are_validated(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("tiny-sc2", overrides)
    assert str(err.value).startswith(message), str(err.value)
