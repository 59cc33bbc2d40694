"""The tensor/sequence-parallel GPT equals the single-process one (fp32, gloo, one 4-rank world).

TP 4 runs on all four ranks; TP 2 as a 2 x 2 grid (two identical data-parallel replicas), so both
replicas check the same layout. tiny-sc1 is MQA (its one KV head is copied on every TP rank);
tiny-sc2 has 2 KV heads, which split at TP 2 and are shared by pairs of ranks at TP 4. A micro
tiny-sc2 at TP 2 + SP also runs with `kernels: triton` (interpreted) against `kernels: torch`.
"""

from __future__ import annotations

import pytest
import torch

from starcoder.parallel import Grid, clip_grad_norm_, grad_norm, reduce_replicated_grads
from tests.distributed import World
from tests.parallel.common import (batch, copies_identical, grid, local_and_reference, model_config,
                                   reference_and_parallel)

REL_TOL = 1e-5
KEY_BIAS_ABS_TOL = 1e-7  # its exact gradient is zero (softmax is shift-invariant): rounding only

LAYOUTS = [(preset, tp, sp) for preset in ("tiny-sc1", "tiny-sc2") for tp in (2, 4) for sp in (False, True)]
EXTRA = [
    # Untied output layer and a vocabulary that needs padding (8064 rows at TP 1, 8192 at TP 4).
    ("tiny-sc2", 4, True, ("model.vocab_size=8000", "model.tie_word_embeddings=false")),
    # Several KV heads per rank (4 KV heads at TP 2, as StarCoder2-7B/15B at TP 2).
    ("tiny-sc2", 2, True, ("model.num_query_groups=4",)),
]


@pytest.fixture(scope="module")
def world():
    with World(4) as w:
        yield w


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _is_vocab(name: str) -> bool:
    return name in ("embedding.word.weight", "head.weight")


def _parity(preset, tp, sp, overrides=()):
    cfg = model_config(preset, tp, sp, overrides)
    g = grid(tp, sp)
    ref, model = reference_and_parallel(cfg, g)
    ref_params = dict(ref.named_parameters())
    out = {"init_mismatch": [], "grads": {}}
    for name, p in model.named_parameters():
        local, full = local_and_reference(p, ref_params[name].detach(), cfg.vocab_size, _is_vocab(name))
        if not torch.equal(p.detach()[local], full):
            out["init_mismatch"].append(name)

    ids, labels = batch(cfg, seed=5)
    out["logits"] = _rel(model(ids), ref(ids))
    ref_loss, loss = ref(ids, labels), model(ids, labels)
    out["loss"] = _rel(loss, ref_loss)
    ref_loss.mean().backward()
    loss.mean().backward()

    # Without the reduction, copies of a KV head (and, under SP, of every LayerNorm) disagree.
    partial = [(p, p.grad) for p in model.parameters() if getattr(p, "partial_grad", False)]
    out["partial_copies_differ"] = bool(partial) and not copies_identical(partial, g)
    reduce_replicated_grads(model, g)
    out["copies_identical"] = copies_identical([(p, p.grad) for p in model.parameters()], g)

    d = cfg.head_dim
    for name, p in model.named_parameters():
        local, full = local_and_reference(p, ref_params[name].grad, cfg.vocab_size, _is_vocab(name))
        mine = p.grad[local]
        if name.endswith("kv_proj.bias"):  # rows [kv_head, (k, v), head_dim]
            mine, full = mine.view(-1, 2, d), full.view(-1, 2, d)
            out["key_bias_abs"] = max(out.get("key_bias_abs", 0.0), (mine[:, 0] - full[:, 0]).abs().max().item())
            out["grads"][name + "[value]"] = _rel(mine[:, 1], full[:, 1])
        else:
            out["grads"][name] = _rel(mine, full)
        if _is_vocab(name):  # padding rows get no gradient
            out["padding_grad"] = max(out.get("padding_grad", 0.0), p.grad[local.stop:].abs().max().item()
                                      if local.stop < p.shape[0] else 0.0)
    ref_norm = torch.cat([q.grad.double().flatten() for q in ref.parameters()]).norm()
    out["grad_norm"] = abs(grad_norm(model.parameters(), g).item() - ref_norm.item()) / ref_norm.item()
    return out


@pytest.mark.parametrize("preset,tp,sp,overrides", [(*layout, ()) for layout in LAYOUTS] + EXTRA,
                         ids=lambda v: "-".join(v) if isinstance(v, tuple) else str(v))
def test_logits_loss_and_every_gradient_match_single_process(world, preset, tp, sp, overrides):
    for rank, r in enumerate(world.run(_parity, preset, tp, sp, overrides)):
        where = f"rank {rank}"
        assert r["init_mismatch"] == [], f"{where}: shards differ from the TP-1 init"
        assert r["logits"] <= REL_TOL and r["loss"] <= REL_TOL, where
        worst = max(r["grads"], key=r["grads"].get)
        assert r["grads"][worst] <= REL_TOL, f"{where}: {worst} gradient off by {r['grads'][worst]:.2e}"
        assert r["key_bias_abs"] <= KEY_BIAS_ABS_TOL, where
        assert r.get("padding_grad", 0.0) == 0.0, where
        assert r["grad_norm"] <= REL_TOL, where
        assert r["copies_identical"], f"{where}: replicated gradients differ after the reduction"
        if sp or preset == "tiny-sc1" or tp == 4:  # some copies saw partial gradients
            assert r["partial_copies_differ"], f"{where}: the reduction had nothing to do"


def _packed(preset, tp, sp):
    """Losses and gradients of packed rows (document ids: attention within documents, positions
    restarting per document), parallel against single-process."""
    cfg = model_config(preset, tp, sp)
    g = grid(tp, sp)
    ref, model = reference_and_parallel(cfg, g)
    ids, labels = batch(cfg, seed=9)
    documents = torch.tensor([[0] * 5 + [1] + [2] * 20 + [3] * 6, [0] * 32])
    losses = [m(ids, labels, document_ids=documents) for m in (ref, model)]
    for loss in losses:
        loss.mean().backward()
    reduce_replicated_grads(model, g)
    ref_params = dict(ref.named_parameters())
    grads = {}
    for name, p in model.named_parameters():
        local, full = local_and_reference(p, ref_params[name].grad, cfg.vocab_size, _is_vocab(name))
        if not name.endswith("kv_proj.bias"):  # its key half is rounding noise (see above)
            grads[name] = _rel(p.grad[local], full)
    return {"loss": _rel(losses[1], losses[0]), "grads": grads,
            "masked": _rel(ref(ids, labels), losses[0].detach())}


@pytest.mark.parametrize("preset", ["tiny-sc1", "tiny-sc2"])
def test_packed_documents_match_single_process(world, preset):
    """Sequence parallel: the embedding adds this rank's slice of the per-document positions."""
    for rank, r in enumerate(world.run(_packed, preset, 2, True)):
        assert r["loss"] <= REL_TOL, f"rank {rank}"
        worst = max(r["grads"], key=r["grads"].get)
        assert r["grads"][worst] <= REL_TOL, f"rank {rank}: {worst} off by {r['grads'][worst]:.2e}"
        assert r["masked"] > 1e-3  # the document ids changed the result


def _steps(preset, tp, sp, optimizer, steps=3):
    cfg = model_config(preset, tp, sp)
    g = grid(tp, sp)
    ref, model = reference_and_parallel(cfg, g, seed=7)
    make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
            "adamw": lambda ps: torch.optim.AdamW(ps, lr=3e-4, weight_decay=0.1)}[optimizer]
    opt_ref, opt = make(ref.parameters()), make(model.parameters())
    losses, ref_losses, norms, ref_norms = [], [], [], []
    ids, labels = batch(cfg, seed=100)  # one batch, learned step by step
    for _ in range(steps):
        for m, o, ls, ns in ((ref, opt_ref, ref_losses, ref_norms), (model, opt, losses, norms)):
            o.zero_grad()
            loss = m(ids, labels).mean()
            loss.backward()
            if m is model:
                reduce_replicated_grads(model, g)
            # The same clipping at TP 1 (torch's fp32 norm-of-norms is off by ~2e-5 here).
            ns.append(clip_grad_norm_(m.parameters(), 1.0, g if m is model else Grid()).item())
            o.step()
            ls.append(loss.item())
    return {"losses": losses, "ref_losses": ref_losses, "norms": norms, "ref_norms": ref_norms,
            "copies_identical": copies_identical([(p, p.detach()) for p in model.parameters()], g),
            "states_identical": copies_identical(
                [(p, s) for p in model.parameters() for s in opt.state[p].values() if s.dim() > 0], g)}


@pytest.mark.parametrize("preset,tp,sp,optimizer", [("tiny-sc2", 4, True, "adamw"),
                                                    ("tiny-sc1", 2, False, "sgd"),
                                                    ("tiny-sc1", 4, True, "adamw")])
def test_optimizer_steps_keep_replicated_parameters_bit_identical(world, preset, tp, sp, optimizer):
    for rank, r in enumerate(world.run(_steps, preset, tp, sp, optimizer)):
        assert r["copies_identical"] and r["states_identical"], f"rank {rank}: copies drifted apart"
        assert r["losses"] == pytest.approx(r["ref_losses"], rel=1e-5), f"rank {rank}"
        # Adam turns rounding-level differences in near-zero gradient elements into whole steps
        # of lr (m / sqrt(v) is about +-1 there), so its later gradient norms agree less closely.
        norm_tol = 1e-3 if optimizer == "adamw" else 1e-5
        assert r["norms"] == pytest.approx(r["ref_norms"], rel=norm_tol), f"rank {rank}"
        assert r["losses"][-1] < r["losses"][0]  # the steps did train


def _dropout_replay(tp, sp, recompute):
    """Loss and gradients with every dropout on; the default generators are seeded alike on all
    ranks, as a trainer does."""
    cfg = model_config("tiny-sc2", tp, sp, ("model.attention_dropout=0.2", "model.hidden_dropout=0.2",
                                            "model.embedding_dropout=0.2", f"model.recompute={recompute}"))
    g = grid(tp, sp)
    _, model = reference_and_parallel(cfg, g)
    ids, labels = batch(cfg, seed=3)
    torch.manual_seed(11)
    loss = model(ids, labels).mean()
    loss.backward()
    reduce_replicated_grads(model, g)
    with torch.no_grad():
        dropped_out = loss.item() != model.eval()(ids, labels).mean().item()
    return {"grads": {n: p.grad.clone() for n, p in model.named_parameters()}, "dropped_out": dropped_out,
            "copies_identical": copies_identical([(p, p.grad) for p in model.parameters()], g),
            "default_stream": torch.rand(4)}


@pytest.mark.parametrize("sp", [False, True])
def test_dropout_is_replayed_by_recomputation_and_agrees_across_copies(world, sp):
    plain = world.run(_dropout_replay, 2, sp, "none")
    for recompute in ("selective", "full"):
        again = world.run(_dropout_replay, 2, sp, recompute)
        for a, b in zip(plain, again):
            for name in a["grads"]:
                torch.testing.assert_close(b["grads"][name], a["grads"][name], rtol=1e-6, atol=1e-9,
                                           msg=f"{recompute} recompute changed {name}")
    for r in plain:
        assert r["dropped_out"]
        assert r["copies_identical"]  # replicated activations dropped out alike on all TP ranks
        # The forks drew from the default stream alike on every rank.
        assert torch.equal(r["default_stream"], plain[0]["default_stream"])


def _recompute_counts(sp, mode):
    """One step of tiny-sc1 at TP 2: attention forwards, GEMMs and TP bytes sent, gradients."""
    from starcoder.parallel.comm_accounting import CommAccounting
    from tests.test_recompute import ATTENTION, GEMMS, OpCounter

    cfg = model_config("tiny-sc1", 2, sp, (f"model.recompute={mode}",))
    g = grid(2, sp)
    _, model = reference_and_parallel(cfg, g)
    ids, labels = batch(cfg, seed=3)
    with OpCounter() as ops, CommAccounting({"tp": g.group("tp")}) as comm:
        model(ids, labels).mean().backward()
    tp_sent = sum(sent for (group, _), sent in comm.sent().items() if group == "tp")
    return {"attention": ops.count(ATTENTION), "gemms": ops.count(GEMMS), "tp_sent": tp_sent,
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


@pytest.mark.parametrize("sp", [False, True])
def test_selective_recompute_under_tensor_parallel(world, sp):
    """Selective runs attention and the GEMMs once; it replays the block's collectives (their
    outputs cannot be kept, starcoder.models.recompute) as full recompute does."""
    runs = {mode: world.run(_recompute_counts, sp, mode) for mode in ("none", "selective", "full")}
    for rank in range(len(runs["none"])):
        none, selective, full = (runs[m][rank] for m in ("none", "selective", "full"))
        assert selective["attention"] == none["attention"] < full["attention"]
        assert selective["gemms"] == none["gemms"] < full["gemms"]
        assert none["tp_sent"] < selective["tp_sent"] == full["tp_sent"]
        for name, grad in none["grads"].items():
            assert torch.equal(selective["grads"][name], grad), name
            assert torch.equal(full["grads"][name], grad), name


# A micro tiny-sc2 (the Triton interpreter is slow): 4 query heads of 16, 2 KV heads, 96 tokens.
MICRO = ("model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=128",
         "model.num_layers=1", "model.vocab_size=96", "model.make_vocab_size_divisible_by=8")


def _triton_parity():
    """The same TP 2 + SP model with `kernels: triton` (interpreted) and `torch`: fused residual
    adds in the blocks, the Triton shard cross-entropy in the output layer."""
    cfg = model_config("tiny-sc2", 2, True, MICRO)
    g = grid(2, True)
    ids, labels = batch(cfg, seed=5, size=(2, 16))
    out = {}
    for kernels in ("torch", "triton"):
        _, model = reference_and_parallel(cfg, g)
        model.set_kernels(kernels)
        loss = model(ids, labels).mean()
        loss.backward()
        reduce_replicated_grads(model, g)
        out[kernels] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    (loss_t, grads_t), (loss_k, grads_k) = out["torch"], out["triton"]
    return {"loss": _rel(loss_k, loss_t), "grads": max(_rel(grads_k[n], grads_t[n]) for n in grads_t),
            "head_backend": model.head.backend,
            "copies_identical": copies_identical([(p, p.grad) for p in model.parameters()], g)}


def test_triton_kernels_match_torch_at_tp2_with_sequence_parallel(world):
    for rank, r in enumerate(world.run(_triton_parity)):
        assert r["head_backend"] == "triton", f"rank {rank}: set_kernels missed the output layer"
        assert r["loss"] <= REL_TOL and r["grads"] <= REL_TOL, f"rank {rank}: {r}"
        assert r["copies_identical"], f"rank {rank}"
