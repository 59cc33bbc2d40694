"""`parallelize(model, grid)`: the one place that turns a single-process `GPT` into its tensor- and
sequence-parallel form, in place (torchtitan-style: the model definition knows nothing of it).

Layout per block (Megatron's): query heads split over the TP ranks (column-parallel `q_proj`),
`out_proj` and `fc_out` row-parallel, `fc_in` column-parallel, LayerNorms and row-parallel biases
replicated. KV heads: with num_query_groups % tp == 0 they split like the query heads; with fewer
KV heads than ranks (tp % num_query_groups == 0: MQA, StarCoder2-3B at TP 4) each block of
tp / num_query_groups adjacent ranks holds the one KV head its query heads use, and those copies'
gradients are summed within the block (`reduce_replicated_grads`), keeping the copies
bit-identical. The input of `q_proj`/`kv_proj` is gathered (or copied) once per attention.
The embedding and the output layer split the (padded) vocabulary.

With sequence parallel, LayerNorms, dropout and residuals work on [batch, seq / tp, hidden]: the
embedding reduce-scatters, every TP region gathers its input and reduce-scatters its output, and
the output layer gathers before the logits.
"""

from __future__ import annotations

import functools

import torch.nn as nn

from starcoder.config import ConfigError
from starcoder.models.gpt import GPT, Block
from starcoder.parallel.grid import Grid
from starcoder.parallel.layers import (ColumnParallelLinear, ParallelEmbedding, RowParallelLinear,
                                       VocabParallelEmbedding, VocabParallelOutputLayer,
                                       input_to_tp, mark_replicated)
from starcoder.parallel.random import TPDropout, tp_rng_fork


def kv_copies(num_query_groups: int, tp: int) -> int:
    """How many adjacent TP ranks hold each KV head (1 when the KV heads split over the ranks)."""
    if num_query_groups % tp == 0:
        return 1
    if tp % num_query_groups == 0:
        return tp // num_query_groups
    raise ConfigError(f"parallel.tensor_parallel: {tp} must divide model.num_query_groups "
                      f"({num_query_groups}) or be a multiple of it")


def parallelize(model: GPT, grid: Grid) -> GPT:
    """Shard `model` over `grid`'s tensor-parallel group (a no-op at tp 1) and return it.

    Build the model with `GPT(cfg.model, padded_vocab_size=cfg.model.padded_vocab_size(tp))`.
    Sharded parameters keep their slice of the current values, so this works before or after
    `init_weights` and on the meta device. Collective: all ranks call it together."""
    if grid.tp == 1:
        return model
    cfg, sp = model.cfg, grid.sequence_parallel
    if model.padded_vocab_size % grid.tp:
        raise ValueError(f"the model's vocabulary is padded to {model.padded_vocab_size} rows, which do "
                         f"not split over tensor parallel {grid.tp}: build it with GPT(cfg.model, "
                         f"padded_vocab_size=cfg.model.padded_vocab_size({grid.tp}))")
    copies = kv_copies(cfg.num_query_groups, grid.tp)
    if 1 < copies < grid.tp:
        grid.kv_mesh(copies)  # creates the KV-copy process groups now, on every rank together

    emb = model.embedding
    if emb.position is not None:
        mark_replicated(emb.position.weight, grid, partial_grad=sp)
    model.embedding = ParallelEmbedding(VocabParallelEmbedding.from_dense(emb.word, grid),
                                        emb.position, _dropout(emb.dropout, grid), grid)
    for block in model.blocks.values():
        _parallelize_block(block, grid, copies)
    _mark_norm(model.final_norm, grid)
    model.head = VocabParallelOutputLayer.from_dense(model.head, grid)
    return model


def materialize(model: nn.Module, device) -> nn.Module:
    """`model.to_empty(device=device)` keeping each parameter's shard description, for a model
    built and parallelized on the meta device (to_empty makes new parameter objects and drops
    their attributes). Follow with `init_weights`."""
    descriptions = {name: dict(p.__dict__) for name, p in model.named_parameters()}
    model.to_empty(device=device)
    for name, p in model.named_parameters():
        p.__dict__.update(descriptions[name])
    return model


def _parallelize_block(block: Block, grid: Grid, copies: int) -> None:
    attn, mlp = block.attn, block.mlp
    attn.q_proj = ColumnParallelLinear.from_dense(attn.q_proj, grid, enter_region=False)
    attn.kv_proj = ColumnParallelLinear.from_dense(
        attn.kv_proj, grid, rows=_kv_rows(attn.kv_proj.out_features, grid, copies), copies=copies,
        enter_region=False)
    if copies > 1:
        for param in attn.kv_proj.parameters():
            param.partial_grad = True  # each copy sees only its own query heads' gradient
    attn.out_proj = RowParallelLinear.from_dense(attn.out_proj, grid)
    attn.register_forward_pre_hook(lambda module, args: (input_to_tp(args[0], grid), *args[1:]))
    attn.rng_fork = functools.partial(tp_rng_fork, grid.tp_rank)  # attention dropout: this rank's heads

    mlp.fc_in = ColumnParallelLinear.from_dense(mlp.fc_in, grid)
    mlp.fc_out = RowParallelLinear.from_dense(mlp.fc_out, grid)
    _mark_norm(block.attn_norm, grid)
    _mark_norm(block.mlp_norm, grid)
    block.dropout = _dropout(block.dropout, grid)


def _kv_rows(rows: int, grid: Grid, copies: int) -> slice:
    """Rows are [kv_head, (k, v), head_dim]: whole-row blocks select KV heads. The block of TP
    ranks t with t // copies == j holds KV share j."""
    shares = grid.tp // copies
    n = rows // shares
    j = grid.tp_rank // copies
    return slice(j * n, (j + 1) * n)


def _mark_norm(norm: nn.Module, grid: Grid) -> None:
    for param in norm.parameters():
        mark_replicated(param, grid, partial_grad=grid.sequence_parallel)


def _dropout(dropout: nn.Dropout, grid: Grid) -> nn.Module:
    """Sequence-parallel regions drop out each sequence shard with its own mask."""
    return TPDropout(dropout.p, grid.tp_rank) if grid.sequence_parallel else dropout
