"""Cross-entropy: whole-vocabulary, vocabulary-parallel pieces and chunked linear + CE."""

import pytest
import torch

from starcoder.kernels import (
    cross_entropy,
    cross_entropy_reference,
    cross_entropy_shard_backward,
    cross_entropy_shard_stats,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)
from tests.kernels.checks import DEVICE, DTYPES, ELEMENTWISE_TOLERANCE, TOLERANCE, assert_close, randn, upcast

VOCAB = 300  # not a multiple of the interpreter's 64-wide vocabulary blocks


def make_labels(shape, vocab, generator):
    labels = torch.randint(0, vocab, shape, generator=generator)
    labels.view(-1)[::5] = -100  # ignored positions
    return labels.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace-backward"])
def test_matches_reference(dtype, inplace):
    g = torch.Generator().manual_seed(7)
    logits = randn(3, 7, VOCAB, dtype=dtype, generator=g, scale=8.0)  # peaked rows
    labels = make_labels((3, 7), VOCAB, g)
    work = logits.clone() if inplace else logits  # the inplace backward overwrites its input
    loss = cross_entropy(work, labels, inplace_backward=inplace)
    grad = randn(3, 7, dtype=torch.float32, generator=g, requires_grad=False)
    (dlogits,) = torch.autograd.grad(loss, logits, grad)

    (ref_logits,) = upcast(logits)
    ref = cross_entropy_reference(ref_logits, labels)
    (ref_grad,) = torch.autograd.grad(ref, ref_logits, grad)
    assert loss.dtype == torch.float32 and loss.shape == labels.shape
    assert (loss[labels == -100] == 0).all()
    assert (dlogits[labels == -100] == 0).all()
    assert_close(loss, ref, 1e-5, "loss")
    assert_close(dlogits, ref_grad, ELEMENTWISE_TOLERANCE[dtype], "dlogits")


def test_inplace_backward_is_caught_when_logits_are_read_later():
    logits = torch.randn(4, VOCAB, device=DEVICE, requires_grad=True)
    work = logits * 1.0
    side = work.sin()  # saves `work` for its own backward
    loss = cross_entropy(work, torch.zeros(4, dtype=torch.long, device=DEVICE), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss.sum() + side.sum()).backward()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vocab_parallel_pieces_reproduce_the_full_loss(dtype):
    """Three shards reduced the way starcoder.parallel does (max, then sums) equal the whole."""
    g = torch.Generator().manual_seed(11)
    tokens, shards = 13, 3
    shard_vocab = VOCAB // shards
    logits = randn(tokens, VOCAB, dtype=dtype, generator=g, scale=5.0, requires_grad=False)
    labels = make_labels((tokens,), VOCAB, g)
    parts = [logits[:, r * shard_vocab:(r + 1) * shard_vocab].contiguous() for r in range(shards)]
    stats = [cross_entropy_shard_stats(p, labels, r * shard_vocab) for r, p in enumerate(parts)]
    global_max = torch.stack([s[0] for s in stats]).amax(0)                      # all_reduce MAX
    sum_exp = sum(s[1] * torch.exp(s[0] - global_max) for s in stats)            # all_reduce SUM
    target = sum(s[2] for s in stats)                                            # all_reduce SUM
    lse = global_max + torch.log(sum_exp)
    loss = torch.where(labels == -100, 0.0, lse - target)

    (ref_logits,) = upcast(logits.requires_grad_())
    ref = cross_entropy_reference(ref_logits, labels)
    grad = torch.rand(tokens, generator=g).to(DEVICE)
    (ref_grad,) = torch.autograd.grad(ref, ref_logits, grad)
    assert_close(loss, ref, 1e-5, "loss")
    tol = ELEMENTWISE_TOLERANCE[dtype]
    for r, p in enumerate(parts):
        cols = slice(r * shard_vocab, (r + 1) * shard_vocab)
        out = cross_entropy_shard_backward(p, labels, lse, grad, r * shard_vocab)
        assert out.dtype == dtype
        assert_close(out, ref_grad[:, cols], tol, f"shard {r} grad")
        in_place = cross_entropy_shard_backward(p, labels, lse, grad, r * shard_vocab, inplace=True)
        assert in_place.data_ptr() == p.data_ptr()
        assert_close(in_place, ref_grad[:, cols], tol, f"shard {r} inplace grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk_rows", [8, None], ids=["chunks-of-8", "default-chunk"])
def test_linear_cross_entropy(dtype, chunk_rows):
    g = torch.Generator().manual_seed(13)
    hidden = randn(3, 7, 48, dtype=dtype, generator=g)  # 21 tokens: the last chunk is partial
    weight = randn(VOCAB, 48, dtype=dtype, generator=g, scale=0.5)
    labels = make_labels((3, 7), VOCAB, g)
    loss = linear_cross_entropy(hidden, weight, labels, chunk_rows=chunk_rows)
    grad = torch.rand(3, 7, generator=g).to(DEVICE)
    dh, dw = torch.autograd.grad(loss, (hidden, weight), grad)
    h32, w32 = upcast(hidden, weight)
    ref = linear_cross_entropy_reference(h32, w32, labels)
    dh_ref, dw_ref = torch.autograd.grad(ref, (h32, w32), grad)
    tol = TOLERANCE[dtype]
    assert_close(loss, ref, tol, "loss")
    assert_close(dh, dh_ref, 2 * tol, "dhidden")
    assert_close(dw, dw_ref, 2 * tol, "dweight")


def test_linear_cross_entropy_follows_autocast():
    """Under autocast (as the trainer runs) the logits are computed in the autocast dtype, like
    F.linear, and the gradients come back in the parameters' fp32."""
    g = torch.Generator().manual_seed(17)
    hidden = randn(2, 9, 32, dtype=torch.float32, generator=g)
    weight = randn(VOCAB, 32, dtype=torch.float32, generator=g, scale=0.5)
    labels = make_labels((2, 9), VOCAB, g)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, labels, chunk_rows=8)
        ref = cross_entropy_reference(torch.nn.functional.linear(hidden, weight), labels)
    dh, dw = torch.autograd.grad(loss.sum(), (hidden, weight))
    dh_ref, dw_ref = torch.autograd.grad(ref.sum(), (hidden, weight))
    assert dh.dtype == dw.dtype == torch.float32
    assert_close(loss, ref, 1e-5, "loss")  # the same bf16 logits, reduced in fp32
    assert_close(dh, dh_ref, 2e-2, "dhidden")
    assert_close(dw, dw_ref, 2e-2, "dweight")


def test_labels_shape_error():
    with pytest.raises(ValueError, match="labels"):
        cross_entropy(torch.zeros(4, 10, device=DEVICE), torch.zeros(5, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(torch.zeros(4, 8, device=DEVICE), torch.zeros(10, 9, device=DEVICE),
                             torch.zeros(4, dtype=torch.long, device=DEVICE))
