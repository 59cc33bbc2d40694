"""The pieces under the parallel model, in one 4-rank gloo world: autograd collectives, the
vocabulary-parallel cross-entropy (PyTorch and Triton shard pieces), the TP dropout streams (the
module's and the fused kernel's), sequence-parallel linears under the zero-bubble backward split,
meta-device sharding and DCP round trips of the shard description."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

from starcoder.models import GPT, init_weights
from starcoder.models.ops import bias_dropout_add
from starcoder.parallel import materialize, parallelize, to_dtensor
from starcoder.parallel.comm_accounting import CommAccounting
from starcoder.parallel.collectives import (copy_to_tp, gather_from_sp, gather_from_tp, reduce_from_tp,
                                            reduce_scatter_to_sp, scatter_to_tp)
from starcoder.parallel.cross_entropy import vocab_parallel_cross_entropy
from starcoder.parallel.random import TPDropout, tp_rng_fork
from tests.distributed import World
from tests.parallel.common import grid, model_config, reference_and_parallel


@pytest.fixture(scope="module")
def world():
    with World(4) as w:
        yield w


def _value(rank: int, shape, salt: int = 0) -> torch.Tensor:
    """A tensor every rank can rebuild for any rank (small integers: sums are exact)."""
    gen = torch.Generator().manual_seed(1000 * salt + rank)
    return torch.randint(-8, 8, shape, generator=gen).float()


def _collectives(tp):
    group = grid(tp).group("tp")
    r = dist.get_rank(group)
    ranks = range(tp)
    b, s, h = 2, 4 * tp, 3 * tp
    bad = []

    def check(name, op, x_of, g_of, want_y, want_grad):
        x = x_of(r).requires_grad_()
        y = op(x, group)
        y.backward(g_of(r))
        if not (torch.equal(y, want_y) and torch.equal(x.grad, want_grad)):
            bad.append(name)

    full = lambda q: _value(q, (b, s, h), 1)  # noqa: E731
    shard_s = lambda q: _value(q, (b, s // tp, h), 2)  # noqa: E731
    shard_h = lambda q: _value(q, (b, s, h // tp), 3)  # noqa: E731
    upstream = lambda q: _value(q, (b, s, h), 4)  # noqa: E731
    total = lambda f: sum(f(q) for q in ranks)  # noqa: E731
    check("copy_to_tp", copy_to_tp, full, upstream, full(r), total(upstream))
    check("reduce_from_tp", reduce_from_tp, full, upstream, total(full), upstream(r))
    check("gather_from_tp", gather_from_tp, shard_h, full, torch.cat([shard_h(q) for q in ranks], -1),
          full(r).chunk(tp, -1)[r])
    check("scatter_to_tp", scatter_to_tp, lambda q: full(0), shard_h, full(0).chunk(tp, -1)[r],
          torch.cat([shard_h(q) for q in ranks], -1))
    check("gather_from_sp", gather_from_sp, shard_s, full, torch.cat([shard_s(q) for q in ranks], 1),
          total(full).chunk(tp, 1)[r])
    check("reduce_scatter_to_sp", reduce_scatter_to_sp, full, shard_s, total(full).chunk(tp, 1)[r],
          torch.cat([shard_s(q) for q in ranks], 1))
    return bad


@pytest.mark.parametrize("tp", [2, 4])
def test_collectives_forward_and_backward(world, tp):
    assert world.run(_collectives, tp) == [[]] * 4


def _cross_entropy(tp, vocab_size, padded):
    """Vocabulary-parallel loss and logit gradients against F.cross_entropy on the real columns."""
    gen = torch.Generator().manual_seed(vocab_size)
    logits = torch.randn(2, 6, padded, generator=gen) * 3
    labels = torch.randint(0, vocab_size, (2, 6), generator=gen)
    labels[0, 0], labels[1, 3], labels[1, 5] = -100, vocab_size - 1, 0
    upstream = torch.rand(2, 6, generator=gen)
    ref_logits = logits.clone().requires_grad_()
    ref = F.cross_entropy(ref_logits[..., :vocab_size].transpose(1, 2), labels, reduction="none")
    ref.backward(upstream)

    group = grid(tp).group("tp")
    r, n = dist.get_rank(group), padded // tp
    local = logits[..., r * n:(r + 1) * n].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, labels, r * n, vocab_size, group)
    loss.backward(upstream)
    return ((loss - ref).abs().max().item(), loss.dtype,
            (local.grad - ref_logits.grad[..., r * n:(r + 1) * n]).abs().max().item())


# 64 rows over 4 ranks: no padding; 50 real rows: the last shard is partly padding; 20 real rows:
# two shards are padding only.
@pytest.mark.parametrize("tp,vocab_size", [(4, 64), (4, 50), (4, 20), (2, 50)])
def test_vocab_parallel_cross_entropy_ignores_padding(world, tp, vocab_size):
    for loss_err, dtype, grad_err in world.run(_cross_entropy, tp, vocab_size, 64):
        assert dtype == torch.float32
        assert loss_err < 1e-5 and grad_err < 1e-6


def _cross_entropy_backends(tp, vocab_size, padded, dtype):
    """The Triton shard kernels (interpreted on CPU, in-place backward) against the PyTorch shard
    pieces inside the one vocabulary-parallel cross-entropy."""
    gen = torch.Generator().manual_seed(vocab_size + 1)
    logits = (torch.randn(2, 6, padded, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, vocab_size, (2, 6), generator=gen)
    labels[0, 0], labels[1, 3] = -100, vocab_size - 1
    upstream = torch.rand(2, 6, generator=gen)
    group = grid(tp).group("tp")
    r, n = dist.get_rank(group), padded // tp
    got = {}
    for backend in ("torch", "triton"):
        local = logits[..., r * n:(r + 1) * n].clone().requires_grad_()
        work = local * 1  # the layer's own logits, which the in-place backward overwrites
        loss = vocab_parallel_cross_entropy(work, labels, r * n, vocab_size, group, backend,
                                            inplace_backward=True)
        loss.backward(upstream)
        got[backend] = (loss, local.grad)
    (loss_t, grad_t), (loss_k, grad_k) = got["torch"], got["triton"]
    return ((loss_k - loss_t).abs().max().item(), (grad_k.float() - grad_t.float()).abs().max().item(),
            grad_k.dtype == dtype and loss_k.dtype == torch.float32)


# TP 2 with the last shard partly padding; TP 4 with shards of padding only.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("tp,vocab_size", [(2, 50), (4, 20)])
def test_vocab_parallel_cross_entropy_triton_equals_torch(world, tp, vocab_size, dtype):
    tol = 1e-6 if dtype == torch.float32 else 1e-3  # fp16 gradients: one rounding apart
    for loss_err, grad_err, dtypes_ok in world.run(_cross_entropy_backends, tp, vocab_size, 64, dtype):
        assert loss_err < 1e-5 and grad_err < tol and dtypes_ok


class _LogitSizedFloat32(TorchDispatchMode):
    """Counts op outputs that are fp32 and as large as the logits."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.count += sum(isinstance(o, torch.Tensor) and o.dtype == torch.float32
                          and o.numel() >= self.numel for o in outs)
        return out


def test_triton_vocab_parallel_loss_makes_no_fp32_copy_of_the_logits():
    """fp16 logits of a padded shard: the PyTorch pieces upcast them (fp32 temporaries of the
    shard's size, forward and backward); the shard kernels make none and write the gradient into
    the logits' storage."""
    gen = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 40, (2, 6), generator=gen)
    counts = {}
    for backend in ("torch", "triton"):
        leaf = torch.randn(2, 6, 48, generator=gen).half().requires_grad_()
        logits = leaf * 1  # the output layer's own logits
        with _LogitSizedFloat32(logits[..., :40].numel()) as mode:
            loss = vocab_parallel_cross_entropy(logits, labels, 0, 40, None, backend,
                                                inplace_backward=True)
            (grad,) = torch.autograd.grad(loss.sum(), logits)
        counts[backend] = mode.count
        assert (grad[..., 40:] == 0).all()
    assert counts["torch"] > 0 and counts["triton"] == 0
    assert grad.data_ptr() == logits.data_ptr()


def _fused_dropout_streams(tp):
    """Masks of the fused bias-dropout-add kernel under a sequence-parallel TPDropout and under a
    plain nn.Dropout (replicated activations)."""
    g = grid(tp, sequence_parallel=True)
    ones = torch.ones(16, 32)
    masks = []
    for module in (TPDropout(0.5, g.tp_rank), torch.nn.Dropout(0.5)):
        torch.manual_seed(0)  # a trainer seeds every rank alike
        out = bias_dropout_add(ones, torch.zeros(32), torch.zeros_like(ones), module, "triton")
        masks.append(out != 0)
    return g.tp_rank, masks[0], masks[1]


def test_fused_dropout_follows_the_tp_rng_streams(world):
    got = world.run(_fused_dropout_streams, 2)
    for tp_rank, tp_mask, plain_mask in got:
        twin = next(o for o in got if o[0] == tp_rank)
        assert torch.equal(tp_mask, twin[1])  # the same TP rank in the other replica
        assert torch.equal(plain_mask, got[0][2])  # replicated: one mask on every rank
    assert not torch.equal(got[0][1], next(o for o in got if o[0] != got[0][0])[1])


def _rng_streams(tp):
    """Draws inside the fork, by a TPDropout, and from the default stream after them."""
    g = grid(tp)
    torch.manual_seed(0)  # a trainer seeds every rank alike
    with tp_rng_fork(g.tp_rank, torch.device("cpu")):
        forked = torch.rand(8)
    dropout = TPDropout(0.5, g.tp_rank)
    mask = dropout(torch.ones(64)) != 0
    after = torch.rand(8)
    replay_state = torch.get_rng_state()
    with tp_rng_fork(g.tp_rank, torch.device("cpu")):
        first = torch.rand(8)
    torch.set_rng_state(replay_state)  # as activation recomputation does
    with tp_rng_fork(g.tp_rank, torch.device("cpu")):
        replay = torch.rand(8)
    return g.tp_rank, forked, mask, after, torch.equal(first, replay), torch.equal(dropout.eval()(after), after)


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_rng_fork_differs_across_tp_ranks_only(world, tp):
    got = world.run(_rng_streams, tp)
    for tp_rank, forked, mask, after, replayed, eval_identity in got:
        twin = next(o for o in got if o[0] == tp_rank)  # the same TP rank in another replica (or itself)
        assert torch.equal(forked, twin[1]) and torch.equal(mask, twin[2])
        assert torch.equal(after, got[0][3])  # the default stream stays shared
        assert replayed and eval_identity
    by_tp_rank = {o[0]: o for o in got}
    for a in range(tp):
        for b in range(a + 1, tp):
            assert not torch.equal(by_tp_rank[a][1], by_tp_rank[b][1])
            assert not torch.equal(by_tp_rank[a][2], by_tp_rank[b][2])


def _zero_bubble_split(preset, tp):
    """One sequence-parallel block's backward, whole and split as the zero-bubble schedules split
    it (input gradients, then weight gradients, with torch's own functions): the TP collectives
    each pass runs, and whether the split gives the whole backward's gradients bit for bit."""
    cfg = model_config(preset, tp, True)
    g = grid(tp, True)
    _, model = reference_and_parallel(cfg, g)
    block, rope = model.blocks["0"], model._rope(32, torch.device("cpu"))
    gen = torch.Generator().manual_seed(g.tp_rank)
    x0 = torch.randn(2, 32 // tp, cfg.hidden_size, generator=gen)
    upstream = torch.randn(2, 32 // tp, cfg.hidden_size, generator=gen)
    params = list(block.parameters())

    def run(split: bool):
        for p in params:
            p.grad = None
        x = x0.clone().requires_grad_()
        y = block(x, rope)
        counts = []
        for phase in ("input", "weight") if split else ("whole",):
            with CommAccounting({"tp": g.group("tp")}) as acc:
                if phase == "whole":
                    y.backward(upstream)
                elif phase == "input":
                    _, groups = stage_backward_input([y], [upstream], [x], iter(params))
                else:
                    stage_backward_weight(iter(params), groups)
            counts.append(sorted(f"{c.kind} {c.numel}" for c in acc.calls))
        return counts, [x.grad.clone(), *(p.grad.clone() for p in params)]

    (whole,), grads = run(split=False)
    (first, second), split_grads = run(split=True)
    return whole, first, second, all(torch.equal(a, b) for a, b in zip(grads, split_grads))


@pytest.mark.parametrize("preset", ["tiny-sc1", "tiny-sc2"])
def test_zero_bubble_split_of_a_sequence_parallel_block_gathers_each_input_once(world, preset):
    """The whole backward gathers each saved input shard (attention input, fc_in input) once,
    besides the adjoints of the two output reduce-scatters, and reduce-scatters the two input
    gradients; split, the input pass does the adjoints and the reduce-scatters, the weight pass
    exactly the two shard gathers, and nothing else."""
    tp = 2
    full = 2 * 32 * 256  # [batch, seq, hidden] of tiny-sc1 / tiny-sc2
    for whole, first, second, same in world.run(_zero_bubble_split, preset, tp):
        assert whole == sorted([f"all_gather {full}"] * 4 + [f"reduce_scatter {full}"] * 2)
        assert first == sorted([f"all_gather {full}"] * 2 + [f"reduce_scatter {full}"] * 2)
        assert second == [f"all_gather {full}"] * 2
        assert same


def _meta_build(preset, tp, sp):
    """Build on the meta device, shard, materialise, init: the same shards as building on CPU."""
    cfg = model_config(preset, tp, sp)
    g = grid(tp, sp)
    _, eager = reference_and_parallel(cfg, g)
    with torch.device("meta"):
        model = parallelize(GPT(cfg, padded_vocab_size=cfg.padded_vocab_size(tp)), g)
    init_weights(materialize(model, "cpu"), cfg, seed=1)
    eager_params = dict(eager.named_parameters())
    return [n for n, p in model.named_parameters() if not torch.equal(p, eager_params[n])]


def test_meta_device_build_gives_the_same_shards(world):
    assert world.run(_meta_build, "tiny-sc2", 4, True) == [[]] * 4


def _save(path, preset, tp):
    cfg = model_config(preset, tp, False)
    g = grid(tp)
    _, model = reference_and_parallel(cfg, g, seed=1)
    dcp.save({n: to_dtensor(p.detach(), p, g) for n, p in model.named_parameters()}, checkpoint_id=path)


def _load(path, preset, tp):
    """Load into a TP layout (a differently seeded model) and into full tensors without a process
    group; both must equal the seed-1 model."""
    cfg = model_config(preset, tp, False)
    g = grid(tp)
    ref, model = reference_and_parallel(cfg, g, seed=2)
    init_weights(ref, cfg, seed=1)
    dcp.load({n: to_dtensor(p.detach(), p, g) for n, p in model.named_parameters()}, checkpoint_id=path)
    ref_params = dict(ref.named_parameters())
    bad = [n for n, p in model.named_parameters()
           if not torch.equal(p, ref_params[n][getattr(p, "shard_slices", ())])]
    full = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    dcp.load(full, checkpoint_id=path, no_dist=True)
    bad += [f"full {n}" for n, t in full.items() if not torch.equal(t, ref_params[n])]
    return bad


@pytest.mark.parametrize("preset,save_tp,load_tp", [("tiny-sc2", 4, 2), ("tiny-sc1", 2, 4)])
def test_checkpoint_of_shards_and_shared_kv_heads_reloads_at_another_tp(world, tmp_path, preset,
                                                                        save_tp, load_tp):
    world.run(_save, str(tmp_path), preset, save_tp)
    assert world.run(_load, str(tmp_path), preset, load_tp) == [[]] * 4
