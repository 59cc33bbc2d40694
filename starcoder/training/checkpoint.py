"""Checkpoints: `torch.distributed.checkpoint` over safetensors files, committed atomically.
The folder layout, and reading a checkpoint without a process group, are in
`starcoder.convert.checkpoints`.

Tensors are named `model.<param>` (the fp32 main weights, whatever precision the model runs
in), `optim.<param>.<exp_avg|exp_avg_sq|step>` (whole per parameter, also when the distributed
optimizer holds slices: `checkpoint_state` gathers them) and `rng.rank<r>.<cpu|cuda>`. Each is described by its global shape and this rank's shard (a DTensor
over the tensor-parallel mesh for a parameter carrying `full_shape`/`shard_slices`), so a
checkpoint loads onto any data- or tensor-parallel layout, or onto one process (vocabulary
tensors saved at another padding are re-padded, `_load_repadded`). DCP's default
format pickles its `.metadata`; the safetensors storage used here keeps each shard's offsets in
the safetensors headers instead, so loading reads tensors and JSON only and unpickles nothing.

A step folder is written as `.step_0000100.partial`, renamed when every rank has finished, and
only then does `latest` move (write aside, then rename): a crash at any point leaves the previous
checkpoint and `latest` intact. The last file written is `manifest.json` (every file's size and
xxh3 checksum, every tensor's global shape and dtype; each rank checksums its share of the shards).

Resuming (`find_resume`) verifies before it loads: rank 0 reads the manifest and the shard
headers and broadcasts them, every rank checks the checksums of its share of the files, and a
checkpoint that fails is renamed `step_NNNNNNN.corrupt` (set aside, not deleted) while the run
goes on from the newest one that verifies; `latest` is moved onto it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import HuggingFaceStorageWriter

from starcoder.config import Config, ConfigError
from starcoder.convert.checkpoints import (CONFIG_FILE, DCP_DIR, LATEST, STATE_FILE, STEP_RE,
                                           VOCAB_PADDED, CheckpointError,
                                           CheckpointReader, check_files, check_tensors,
                                           checkpoints_dir, dcp_load, describe_file,
                                           quiet_single_process, read_config, read_manifest,
                                           read_state, step_folders, step_name, write_manifest)
from starcoder.parallel import Grid, to_dtensor
from starcoder.training.optimizer import checkpoint_state, restore_state

log = logging.getLogger("starcoder.train")

# --------------------------------------------------------------------------------------------
# What goes into a checkpoint


def describe(tensor: torch.Tensor, param: nn.Parameter, grid: Grid) -> torch.Tensor:
    """`tensor` (a parameter, or optimizer state shaped like it) as DCP should store it: under
    tensor parallelism a DTensor with the global shape and this rank's shard; otherwise the
    tensor itself (DCP treats equal keys on data-parallel ranks as one replicated tensor)."""
    return to_dtensor(tensor, param, grid) if grid.tp > 1 else tensor


def model_tensors(model: nn.Module, weights: dict, grid: Grid) -> dict[str, torch.Tensor]:
    """`weights` ({name: fp32 tensor}, see `checkpoint_state`) as `model.<name>`."""
    return {f"model.{name}": describe(weights[name], p, grid) for name, p in model.named_parameters()}


def optimizer_tensors(states: dict, model: nn.Module, grid: Grid) -> dict:
    params = dict(model.named_parameters())
    out = {}
    for name, state in states.items():
        for key, value in state.items():
            shaped = torch.is_tensor(value) and value.shape == params[name].shape
            out[f"optim.{name}.{key}"] = describe(value, params[name], grid) if shaped else value
    return out


def rng_tensors(grid: Grid, device: torch.device) -> dict[str, torch.Tensor]:
    out = {f"rng.rank{grid.rank}.cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out[f"rng.rank{grid.rank}.cuda"] = torch.cuda.get_rng_state(device)
    return out


# --------------------------------------------------------------------------------------------
# Save


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, optimizer, grid: Grid,
                    device: torch.device, cfg: Config, tokenizer, state: dict,
                    keep_last: int | None = None) -> Path:
    """Write `step_NNNNNNN` (all ranks call this), move `latest` to it and prune old ones."""
    root = checkpoints_dir(run_dir)
    final = root / step_name(step)
    partial = root / f".{final.name}.partial"
    if grid.rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        (partial / DCP_DIR).mkdir(parents=True)
    _barrier()
    weights, states = checkpoint_state(optimizer, model)
    tensors = {**model_tensors(model, weights, grid), **optimizer_tensors(states, model, grid),
               **rng_tensors(grid, device)}
    with quiet_single_process():
        metadata = dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(
            str(partial / DCP_DIR), save_distributed=True))
    # dcp.save returns only after every rank's files are written, with the global metadata.
    _fault("after_shard", step)
    shards = sorted(f"{DCP_DIR}/{p.name}" for p in (partial / DCP_DIR).iterdir())
    files = _gather({name: describe_file(partial / name) for name in shards[grid.rank::grid.world_size]})
    if grid.rank == 0:
        (partial / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
        (partial / CONFIG_FILE).write_text(cfg.to_yaml())
        tokenizer.save(partial)
        _fault("before_manifest", step)
        files.update({p.name: describe_file(p) for p in sorted(partial.iterdir()) if p.is_file()})
        write_manifest(partial, files, {
            key: {"shape": list(meta.size), "dtype": str(meta.properties.dtype)}
            for key, meta in sorted(metadata.state_dict_metadata.items()) if hasattr(meta, "size")})
        _fsync_files(partial)
        if final.exists():  # left by an earlier run that never moved `latest` to it
            set_aside(final, "a new save of the same step replaces it", "replaced")
        os.replace(partial, final)
        _fault("before_latest", step)
        _write_atomic(root / LATEST, final.name + "\n")
        if keep_last:
            prune(root, keep_last, newest=step)
    _barrier()
    return final


def _fault(point: str, step: int) -> None:
    """Test-only fault injection: STARCODER_FAULT=<point>:<step> SIGKILLs this process at that
    point of that step's save (after_shard, before_manifest, before_latest)."""
    if os.environ.get("STARCODER_FAULT") == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def set_aside(folder: Path, why: str, label: str = "corrupt") -> Path:
    """Rename a step folder out of the way (`step_0000100.corrupt`, `.corrupt2`, ...); never delete."""
    for n in range(1, 1000):
        target = folder.with_name(f"{folder.name}.{label}{n if n > 1 else ''}")
        if not target.exists():
            break
    os.replace(folder, target)
    log.warning("set aside %s as %s: %s", folder, target.name, why)
    return target


def prune(root: Path, keep_last: int, newest: int) -> None:
    """Delete step folders older than the `keep_last` newest up to step `newest`."""
    steps = sorted(int(m.group(1)) for p in root.iterdir() if (m := STEP_RE.match(p.name)))
    older = [s for s in steps if s < newest]
    for step in older[: max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(root / step_name(step))


def remove_partial(run_dir: str | Path) -> None:
    """Delete step folders a crash left half written (rank 0, at start-up)."""
    root = checkpoints_dir(run_dir)
    if root.is_dir():
        for p in root.glob(".step_*.partial"):
            log.info("removing %s (an interrupted checkpoint write)", p)
            shutil.rmtree(p)


# --------------------------------------------------------------------------------------------
# Verify


def verify(step_dir: Path, grid: Grid, checksums: bool = True):
    """(problem or None, the shard metadata) for one step folder, the same on every rank (all
    ranks call this). Rank 0 opens the manifest and the shard headers; each rank checks its
    share of the files first."""
    manifest = problem = None
    if grid.rank == 0:
        try:
            manifest = read_manifest(step_dir)
        except CheckpointError as err:
            problem = str(err).removeprefix(f"{step_dir}: ")
    manifest, problem = _broadcast([manifest, problem])
    if problem is not None:
        return problem, None
    names = sorted(manifest["files"])[grid.rank::grid.world_size]
    problem = next((p for p in _all_gather(check_files(step_dir, manifest, names, checksums)) if p), None)
    if problem is not None:
        return problem, None
    metadata = None
    if grid.rank == 0:
        try:
            metadata = CheckpointReader(step_dir / DCP_DIR).read_metadata()
            problem = check_tensors(manifest, metadata)
        except Exception as err:  # an unreadable shard header
            problem = f"cannot read the shard headers ({type(err).__name__}: {err})"
    return tuple(_broadcast([problem, metadata]))


def find_resume(run_dir: Path, grid: Grid, checksums: bool = True):
    """(step folder, its shard metadata) to resume from, or (None, None) for a fresh run (all
    ranks call this). `latest` first, then the other step folders newest first; those that fail
    verification are set aside; `latest` is moved onto the one chosen. A run folder that holds
    checkpoints none of which verifies is an error naming it."""
    root = checkpoints_dir(run_dir)
    candidates = None
    if grid.rank == 0:
        named = _latest_name(root)
        folders = step_folders(run_dir)
        candidates = sorted(folders, key=lambda p: p.name != named)  # stable: newest first after it
    for step_dir in _broadcast([candidates])[0]:
        problem, metadata = verify(step_dir, grid, checksums)
        if problem is None:
            if grid.rank == 0 and _latest_name(root) != step_dir.name:
                log.warning("resuming from %s, the newest checkpoint that verifies; `latest` "
                            "now names it", step_dir)
                _write_atomic(root / LATEST, step_dir.name + "\n")
            return step_dir, metadata
        if grid.rank == 0:
            set_aside(step_dir, problem)
        _barrier()
    error = None
    if grid.rank == 0 and root.is_dir() and any(p.name.startswith("step_") for p in root.iterdir()):
        error = (f"{root}: holds checkpoints but none verifies (they are set aside as "
                 "step_*.corrupt); move them away to start this run from scratch")
    if (error := _broadcast([error])[0]) is not None:
        raise CheckpointError(error)
    return None, None


def _latest_name(root: Path) -> str | None:
    pointer = root / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


# --------------------------------------------------------------------------------------------
# Load


def load_checkpoint(step_dir: Path, model: nn.Module, optimizer, grid: Grid,
                    device: torch.device, cfg: Config, metadata=None) -> dict:
    """Load model, optimizer and (same world size only) RNG states in place; return the JSON
    state. `metadata`: the shard metadata from `verify`, so no rank opens the headers again."""
    step_dir = Path(step_dir)
    state = read_state(step_dir)
    reader = CheckpointReader(step_dir / DCP_DIR, metadata)
    repadded = _check_shapes(model, reader.read_metadata(), read_config(step_dir), cfg, step_dir,
                             stage=grid.pp > 1)
    if grid.pp > 1:  # re-padded reads are collective: every stage walks every stage's names
        everyone = [None] * grid.world_size
        dist.all_gather_object(everyone, sorted(repadded))
        repadded = set().union(*everyone)
    weights, states = checkpoint_state(optimizer, model)
    tensors = {**model_tensors(model, weights, grid), **optimizer_tensors(states, model, grid)}
    stored = reader.read_metadata().state_dict_metadata
    for key in [k for k in tensors if _of_vocab(k, repadded, stored)]:
        del tensors[key]  # read whole at the saved padding below
    same_world = state["world"]["size"] == grid.world_size
    if same_world:
        tensors.update(rng_tensors(grid, device))
    dcp_load(tensors, reader, step_dir)
    if repadded:
        _load_repadded(repadded, model, weights, states, reader, step_dir, cfg.model.vocab_size)
    restore_state(optimizer, model, weights, states)
    if same_world:
        torch.set_rng_state(tensors[f"rng.rank{grid.rank}.cpu"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(tensors[f"rng.rank{grid.rank}.cuda"], device)
    else:
        log.info("checkpoint from %d ranks loaded onto %d: random states start from the seed",
                 state["world"]["size"], grid.world_size)
    return state


def _of_vocab(key: str, names: set[str], metadata) -> bool:
    """Whether tensor `key` is one of the parameters `names` or optimizer state shaped like it."""
    return any(key == f"model.{name}" or (key.startswith(f"optim.{name}.") and key in metadata
                                          and metadata[key].size == metadata[f"model.{name}"].size)
               for name in names)


@torch.no_grad()
def _load_repadded(names: set[str], model: nn.Module, weights: dict, states: dict,
                   reader: CheckpointReader, step_dir: Path, vocab_size: int) -> None:
    """Load vocabulary tensors (and their Adam state) saved at another padding, as when the
    tensor-parallel size changes the padded vocabulary (Megatron pads to a multiple of
    make_vocab_size_divisible_by x tp). Only the first `vocab_size` rows mean anything: every rank
    reads each tensor whole at its saved shape, one tensor at a time (on the CPU), and copies the
    real rows of its own part; padding rows become zero. Each read is collective, so all ranks
    walk the same keys."""
    metadata = reader.read_metadata().state_dict_metadata
    params = dict(model.named_parameters())
    for name in sorted(names):
        param = params.get(name)  # None on pipeline stages without this tensor
        mine = {} if param is None else {f"model.{name}": weights[name]}
        mine.update({f"optim.{name}.{k}": v for k, v in states.get(name, {}).items()
                     if torch.is_tensor(v) and v.shape == param.shape})
        start = getattr(param, "shard_slices", (slice(0, None),))[0].start or 0
        real = max(0, min(param.shape[0] if param is not None else 0, vocab_size - start))
        for key in sorted(k for k in metadata if _of_vocab(k, {name}, metadata)):
            meta = metadata[key]
            whole = {key: torch.empty(meta.size, dtype=meta.properties.dtype)} if key in mine else {}
            dcp_load(whole, reader, step_dir)
            if key in mine:
                mine[key][:real].copy_(whole[key][start:start + real])
                mine[key][real:].zero_()


def _check_shapes(model: nn.Module, metadata, saved: Config, cfg: Config, step_dir: Path,
                  stage: bool = False) -> set[str]:
    """A model that does not fit the checkpoint is a config error naming the first differing key.
    Returns the vocabulary tensors stored at another padding of the same vocabulary. A pipeline
    `stage` holds part of the model: it is checked against those parts of the checkpoint."""
    stored = {k[len("model."):]: tuple(v.size) for k, v in metadata.state_dict_metadata.items()
              if k.startswith("model.")}
    wanted = {n: tuple(getattr(p, "full_shape", p.shape)) for n, p in model.named_parameters()}
    if stage:
        stored = {n: s for n, s in stored.items() if n in wanted}
    repadded = set()
    if saved.model.vocab_size == cfg.model.vocab_size:
        repadded = {n for n in VOCAB_PADDED if n in stored and n in wanted
                    and stored[n] != wanted[n] and stored[n][1:] == wanted[n][1:]}
    if {n: s for n, s in stored.items() if n not in repadded} == \
            {n: s for n, s in wanted.items() if n not in repadded}:
        return repadded
    changed = [f"model.{k}: the checkpoint {step_dir} has {getattr(saved.model, k)!r}, the config "
               f"{v!r}" for k, v in vars(cfg.model).items()
               if getattr(saved.model, k) != v and k not in SHAPELESS and f"model.{k}" not in MAY_CHANGE]
    if changed:
        raise ConfigError("; ".join(changed))
    diff = sorted(set(stored.items()) ^ set(wanted.items()))
    raise ConfigError(f"model: the checkpoint {step_dir} does not fit this model ({diff[0][0]})")


# Model keys that never change a tensor's shape.
SHAPELESS = ("kernels", "recompute", "recompute_layers", "attention_dropout", "hidden_dropout", "embedding_dropout",
             "init_method_std", "make_vocab_size_divisible_by", "activation", "layernorm_epsilon",
             "bos_token_id", "eos_token_id")

# Keys a resumed run may change with a warning: the model keeps its shape, but what it learns or
# the data it sees changes (see docs/training.md for which of them reshuffle the data order).
MAY_CHANGE = ("train.seq_length", "train.global_batch_size", "train.seed", "data.paths",
              "data.split", "data.pack", "model.rope_theta", "model.sliding_window")


def warn_changed_settings(saved: Config, cfg: Config, step_dir: Path) -> list[str]:
    """Log one warning listing every `MAY_CHANGE` key that differs from the checkpoint's config;
    return those keys. (Parallel layout and micro-batch size change silently: resharding is a
    feature; every other training key, e.g. lr or max_steps, is the user's to change.)"""
    def value(c: Config, key: str):
        section, name = key.split(".")
        return getattr(getattr(c, section), name)

    changed = [k for k in MAY_CHANGE if value(saved, k) != value(cfg, k)]
    if changed:
        log.warning("resuming %s with changed settings: %s", step_dir, "; ".join(
            f"{k} {value(saved, k)!r} -> {value(cfg, k)!r}" for k in changed))
    return changed


# --------------------------------------------------------------------------------------------
# Helpers


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _broadcast(objects: list) -> list:
    """Rank 0's `objects` on every rank (pickled in memory by torch.distributed; nothing read
    from a file is unpickled)."""
    if _distributed():
        dist.broadcast_object_list(objects, src=0)
    return objects


def _all_gather(obj) -> list:
    if not _distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _gather(part: dict) -> dict:
    """Every rank's dict merged (on every rank)."""
    return {k: v for d in _all_gather(part) for k, v in d.items()}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_files(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
