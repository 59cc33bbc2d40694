"""The planner's activation bytes equal what one block saves for backward (saved-tensor hooks),
for tiny-sc1 and tiny-sc2, every recompute mode, fp32 and bf16, TP 1 and TP 2 with SP on and off;
with SP the linears' inputs are saved as 1/TP of the sequence."""

from unittest import mock

import pytest
import torch
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import CheckpointPolicy

from starcoder.config import ParallelConfig, load_config
from starcoder.models import GPT, recompute
from starcoder.models.attention import sliding_window_mask
from starcoder.parallel import init_grid, parallelize
from starcoder.planning import activation_tensors, plan_layout
from tests.distributed import World

MICRO_BATCH = 2
CASES = [(name, mode, dtype) for name in ("tiny-sc1", "tiny-sc2")
         for mode in ("none", "selective", "full") for dtype in (torch.float32, torch.bfloat16)]


def saved_block_bytes(model: GPT, x: torch.Tensor, mode: str, blocks: int = 1) -> int:
    """Bytes of the distinct storages the first `blocks` blocks save for backward (run under
    `mode`, or as model.recompute(_layers) say when `blocks` > 1), leaving out what every block
    shares (parameters, RoPE tables, the sliding-window mask): what reaches the saved-tensor
    hooks, plus the op outputs the selective policy keeps (the checkpoint holds those itself)."""
    seq = x.shape[1] * (model.blocks["0"].attn.q_proj.grid.tp
                        if getattr(model.blocks["0"].attn.q_proj, "grid", None)
                        and model.blocks["0"].attn.q_proj.grid.sequence_parallel else 1)
    rope = model._rope(seq, x.device)
    shared = [*model.parameters(), *(rope or ())]
    if model.cfg.sliding_window:
        shared.append(sliding_window_mask(seq, seq, model.cfg.sliding_window, True, x.device))
    skip = {t.untyped_storage().data_ptr() for t in shared}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t
    def keeping(ctx, op, *args, **kwargs):
        decision = policy(ctx, op, *args, **kwargs)
        if decision == CheckpointPolicy.MUST_SAVE:
            for t in tree_leaves(ctx.op_output):
                if isinstance(t, torch.Tensor):
                    pack(t)
        return decision
    policy = recompute.policy
    with mock.patch.object(recompute, "policy", keeping), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if blocks == 1:
            y = recompute.run_block(model.blocks["0"], x, rope, mode)
        else:
            first = dict(list(model.blocks.items())[:blocks])
            y = recompute.run_blocks(first, x, rope, model.cfg, training=True)
    y.float().sum().backward()
    return sum(storages.values())


def measure_and_predict(name, mode, dtype, tp=1, sp=False, grid=None):
    cfg = load_config(name, [f"model.recompute={mode}", f"parallel.tensor_parallel={tp}",
                             f"parallel.sequence_parallel={str(sp).lower()}"])
    torch.manual_seed(0)
    model = GPT(cfg.model, padded_vocab_size=cfg.model.padded_vocab_size(tp))
    if grid is not None:
        model = parallelize(model, grid)
    model = model.to(dtype).train()
    seq = cfg.train.seq_length
    x = torch.randn(MICRO_BATCH, seq // tp if sp else seq, cfg.model.hidden_size, dtype=dtype,
                    requires_grad=True)
    measured = saved_block_bytes(model, x, mode)
    # CPU SDPA serves a window mask with its flash kernel (plus an additive copy of the mask).
    path = "sdpa-mask" if cfg.model.sliding_window else "flash"
    predicted = sum(activation_tensors(cfg.model, tp, sp, MICRO_BATCH, seq, dtype.itemsize, mode,
                                       path).values())
    return measured, predicted


@pytest.mark.parametrize("name, mode, dtype", CASES)
def test_planner_equals_measured_bytes_tp1(name, mode, dtype):
    measured, predicted = measure_and_predict(name, mode, dtype)
    assert abs(predicted / measured - 1) < 0.05, (measured, predicted)


def _tp2_cases():
    grids = {sp: init_grid(ParallelConfig(tensor_parallel=2, sequence_parallel=sp)) for sp in (False, True)}
    out = []
    for name, mode, dtype in CASES:
        for sp in (False, True):
            grid = grids[sp]
            grid.sequence_parallel = sp
            out.append((name, mode, str(dtype), sp, *measure_and_predict(name, mode, dtype, 2, sp, grid)))
    return out


@pytest.fixture(scope="module")
def world():
    w = World(2)
    yield w
    w.close()


def test_planner_equals_measured_bytes_tp2(world):
    for rank_results in world.run(_tp2_cases):
        for name, mode, dtype, sp, measured, predicted in rank_results:
            assert abs(predicted / measured - 1) < 0.05, (name, mode, dtype, sp, measured, predicted)


@pytest.mark.parametrize("name", ["tiny-sc1", "tiny-sc2"])
def test_selective_saves_less_than_none_and_full_least(name):
    saved = {mode: measure_and_predict(name, mode, torch.float32)[0] for mode in ("none", "selective", "full")}
    assert saved["full"] < saved["selective"] < saved["none"], saved


def test_recompute_layers_blocks_save_only_their_input():
    """Three blocks, full recompute on the first one: the planner's activation term (micro-batch
    of 2, fp32, one stage) equals the measured bytes of the three."""
    cfg = load_config("tiny-sc1", ["model.num_layers=3", "model.recompute=full", "model.recompute_layers=1",
                                   "train.precision=fp32", f"train.micro_batch_size={MICRO_BATCH}"])
    torch.manual_seed(0)
    model = GPT(cfg.model).train()
    x = torch.randn(MICRO_BATCH, cfg.train.seq_length, cfg.model.hidden_size, requires_grad=True)
    measured = saved_block_bytes(model, x, "full", blocks=3)
    predicted = plan_layout(cfg).terms["activations"]
    full = sum(activation_tensors(cfg.model, 1, False, MICRO_BATCH, cfg.train.seq_length, 4, "full").values())
    assert full < predicted / 3  # the first block's share is its input only
    assert abs(predicted / measured - 1) < 0.05, (measured, predicted)


def _linear_inputs(name):
    """Per SP setting at TP 2 (fp32): bytes saved of the q/kv and fc_in inputs (the outputs of
    attn_norm and mlp_norm), how many norm outputs there were, and the shapes of every saved
    tensor of b x s x h elements with h last (F.linear saves a 3-D input as a 2-D view)."""
    out = {}
    for sp in (False, True):
        cfg = load_config(name, ["parallel.tensor_parallel=2", f"parallel.sequence_parallel={str(sp).lower()}"])
        grid = init_grid(ParallelConfig(tensor_parallel=2, sequence_parallel=sp))
        torch.manual_seed(0)
        model = parallelize(GPT(cfg.model, padded_vocab_size=cfg.model.padded_vocab_size(2)), grid).train()
        block, seq, h = model.blocks["0"], cfg.train.seq_length, cfg.model.hidden_size
        x = torch.randn(MICRO_BATCH, seq // 2 if sp else seq, h, requires_grad=True)
        norm_outputs = {}
        for norm in (block.attn_norm, block.mlp_norm):
            norm.register_forward_hook(lambda m, a, y: norm_outputs.setdefault(y.untyped_storage().data_ptr(), y))
        saved, weights = {}, {p.untyped_storage().data_ptr() for p in model.parameters()}

        def pack(t):
            if t.untyped_storage().data_ptr() not in weights:
                saved[t.untyped_storage().data_ptr()] = t
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = block(x, model._rope(seq, x.device))
        y.sum().backward()
        out[sp] = (sum(t.untyped_storage().nbytes() for p, t in saved.items() if p in norm_outputs),
                   len(norm_outputs),
                   [tuple(t.shape) for t in saved.values()
                    if t.shape[-1] == h and t.numel() == MICRO_BATCH * seq * h])
    return out


@pytest.mark.parametrize("name", ["tiny-sc1", "tiny-sc2"])
def test_sequence_parallel_saves_the_linear_inputs_as_one_tp_th_of_the_sequence(world, name):
    b, s, h, e, tp = MICRO_BATCH, 256, 256, 4, 2
    for got in world.run(_linear_inputs, name):
        assert got[False][:2] == (2 * b * s * h * e, 2)  # the whole inputs
        assert got[True] == (2 * b * s // tp * h * e, 2, [])  # shards; no gathered input saved


def _autocast_inputs(name):
    """An SP block at TP 2 with fp32 weights under bf16 autocast: the distinct saved bf16
    [batch, seq / 2, hidden] tensors (casts of a linear input's shard), and the dtypes of the
    forward's TP all-gathers."""
    from starcoder.parallel.comm_accounting import CommAccounting

    cfg = load_config(name, ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"])
    grid = init_grid(ParallelConfig(tensor_parallel=2, sequence_parallel=True))
    torch.manual_seed(0)
    model = parallelize(GPT(cfg.model, padded_vocab_size=cfg.model.padded_vocab_size(2)), grid).train()
    seq, h = cfg.train.seq_length, cfg.model.hidden_size
    x = torch.randn(MICRO_BATCH, seq // 2, h, requires_grad=True)
    casts = {}

    def pack(t):
        if t.dtype == torch.bfloat16 and tuple(t.shape) == (MICRO_BATCH, seq // 2, h):
            casts[t.untyped_storage().data_ptr()] = tuple(t.shape)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            CommAccounting({"tp": grid.group("tp")}) as accounting, \
            torch.autocast("cpu", dtype=torch.bfloat16):
        y = model.blocks["0"](x, model._rope(seq, x.device))
    y.float().sum().backward()
    return len(casts), [str(c.dtype) for c in accounting.calls if c.kind == "all_gather"]


@pytest.mark.parametrize("name", ["tiny-sc1", "tiny-sc2"])
def test_under_autocast_q_and_kv_share_one_cast_of_their_input_shard(world, name):
    for casts, gathers in world.run(_autocast_inputs, name):
        assert casts == 2  # the attention input (q and kv) and the fc_in input, each cast once
        assert gathers == ["torch.bfloat16"] * 2  # the forward gathers move the cast bytes
