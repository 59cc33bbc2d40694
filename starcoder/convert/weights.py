"""Reading weights from any kind of folder, checked before a byte of them is used.

Folders understood: a native model folder (`config.yaml` + safetensors), a Hugging Face model
folder (`config.json` + safetensors, GPTBigCode or Starcoder2), a training run folder (its
`checkpoints/latest`) and a checkpoint step folder. Before anything is read, the stored tensors
(safetensors headers or DCP metadata: names, shapes, dtypes) are checked against the shapes the
folder's own config implies, so a missing, extra or mis-shaped tensor is an error naming it.

Two ways to read:
* `iter_weights` streams full tensors under native names, unsharded and unpadded, one at a time
  (conversion, `load_model`);
* `load_weights` fills a model, possibly split for tensor parallelism and cut to a rank's
  pipeline stages, in place (`train.init_from`): it insists that the source has the whole model's
  tensors and shapes (only vocabulary rows may differ, within the padding) and reads only this
  rank's slices of the tensors its stages hold; the ranks share a step folder's checksumming.

A checkpoint of a LoRA run (`finetune.lora_rank` > 0) reads as its merged weights both ways; the
model's own adapters (a LoRA model being filled with its base) are left as they are.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import yaml

from starcoder.config import Config, TrainConfig, UserError
from starcoder.convert import checkpoints
from starcoder.convert.checkpoints import (DCP_DIR, VOCAB_PADDED, CheckpointReader, check_files,
                                           check_tensors, dcp_load, is_step_folder,
                                           iter_checkpoint_weights, raise_problem, read_manifest,
                                           resolve_checkpoint, verify_step_folder)
from starcoder.convert.hf import hf_to_native, ignored_hf, model_config_from_hf, native_origins, native_to_hf
from starcoder.convert.lora import adapted_weights, delta, is_lora, lora_shapes, merge_lora
from starcoder.convert.native import CONFIG_NAME, is_model_folder, iter_model_folder
from starcoder.convert.native import read_config as read_native_config
from starcoder.convert.sharded import iter_safetensors, open_safetensors, read_headers
from starcoder.models.gpt import GPT
from starcoder.parallel import to_dtensor

HF_CONFIG = "config.json"
# safetensors header dtypes, by the names torch gives them
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
           "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
           "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
# Keys that change what the rows of equally shaped attention tensors mean.
_HEAD_LAYOUT = ("architecture", "num_attention_heads", "num_query_groups")
# Keys that shape tensors, named when shapes do not fit.
_SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "vocab_size", "tie_word_embeddings",
               "position_embedding", *_HEAD_LAYOUT)


def is_hf_folder(path: Path) -> bool:
    return (Path(path) / HF_CONFIG).is_file()


def resolve_folder(path: str | Path) -> Path:
    """The folder that holds the weights and tokenizer: a training run folder means its latest
    step folder; any other folder means itself."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such folder")
    try:
        return resolve_checkpoint(path) or path
    except FileNotFoundError as err:  # `latest` names a folder that is gone
        raise UserError(str(err)) from None


def folder_kind(path: Path) -> str:
    if is_step_folder(path):  # before is_model_folder: a step folder has a config.yaml too
        return "step"
    if is_model_folder(path):
        return "native"
    if is_hf_folder(path):
        return "hf"
    raise UserError(f"{path}: not a model folder (no config.yaml), a Hugging Face model "
                    f"(no config.json), a training run (no checkpoints/latest) nor a "
                    f"checkpoint step folder (no trainer_state.json)")


def read_folder_config(path: Path, kind: str) -> Config:
    if kind == "step":
        return checkpoints.read_config(path)
    if kind == "native":
        try:
            return read_native_config(path)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise UserError(f"{path / CONFIG_NAME}: not valid YAML ({getattr(err, 'problem', err)}{where})") from None
        except (ValueError, TypeError, AttributeError) as err:  # unknown keys, bad values
            raise UserError(f"{path / CONFIG_NAME}: {err}") from None
    return config_from_hf_folder(path)


def config_from_hf_folder(path: Path) -> Config:
    file = Path(path) / HF_CONFIG
    try:
        model = model_config_from_hf(json.loads(file.read_text()))
        return Config(model=model, train=TrainConfig(seq_length=model.max_position_embeddings)).validate()
    except KeyError as err:
        raise UserError(f"{file}: lacks the key {err}") from None
    except (ValueError, TypeError) as err:  # not JSON, an unknown model_type, a bad value
        raise UserError(f"{file}: {err}") from None


# --------------------------------------------------------------------------------------------
# Checking what is stored against what the config implies


def native_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Parameter name -> unpadded full shape of the model `cfg` describes."""
    with torch.device("meta"):
        model = GPT(cfg.model, padded_vocab_size=cfg.model.vocab_size)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def hf_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    meta = ((name, torch.empty(shape, device="meta")) for name, shape in native_shapes(cfg).items())
    return {name: tuple(t.shape) for name, t in native_to_hf(cfg.model, meta)}


def stored_tensors(path: Path, kind: str, cfg: Config) -> dict[str, tuple[tuple[int, ...], str, Path]]:
    """name -> (shape, dtype, file) as stored, from headers or DCP metadata only."""
    if kind == "step":
        metadata = CheckpointReader(path / DCP_DIR).read_metadata().state_dict_metadata
        out = {}
        for key, meta in metadata.items():
            if key.startswith("model."):
                name, shape = key[len("model."):], tuple(meta.size)
                if name in VOCAB_PADDED:  # stored at the run's padding; the real rows count
                    shape = (min(shape[0], cfg.model.vocab_size), *shape[1:])
                out[name] = (shape, str(meta.properties.dtype).removeprefix("torch."), path / DCP_DIR)
        return out
    headers = read_headers(path)
    return {name: (shape, _DTYPES.get(dtype, dtype), file) for name, (file, shape, dtype) in headers.items()}


def check_folder(path: Path, kind: str, cfg: Config) -> None:
    """Every tensor the config implies is stored, with its shape and a floating dtype, and no
    other: an error names the first tensor that is not."""
    config_file = {"step": checkpoints.CONFIG_FILE, "native": CONFIG_NAME, "hf": HF_CONFIG}[kind]
    expected = hf_shapes(cfg) if kind == "hf" else native_shapes(cfg)
    if kind == "step":  # a LoRA run's checkpoint holds its adapters beside the base
        expected.update(lora_shapes(cfg))
    ignored = ignored_hf(cfg.model) if kind == "hf" else None
    stored = stored_tensors(path, kind, cfg)
    for name, (shape, dtype, file) in sorted(stored.items()):
        if ignored is not None and ignored.match(name):
            continue
        if name not in expected:
            raise UserError(f"{file}: tensor {name} is not part of the model {path / config_file} "
                            f"describes")
        if shape != expected[name]:
            raise UserError(f"{file}: tensor {name} has shape {shape}; {path / config_file} "
                            f"implies {expected[name]}")
        if not dtype.startswith(("float", "bfloat")):
            raise UserError(f"{file}: tensor {name} has dtype {dtype}; weights are floating point")
    missing = sorted(set(expected) - set(stored))
    if missing:
        raise UserError(f"{path}: tensor {missing[0]} is missing ({len(missing)} of the tensors "
                        f"{path / config_file} implies are missing)")


def open_weights(path: str | Path, all_ranks: bool = False, verify: bool = True
                 ) -> tuple[Path, str, Config]:
    """(folder, kind, config) of a readable folder whose tensors fit its config. `all_ranks`:
    every rank of the initialised process group calls this, and they share the checksumming
    of a step folder (`verify_shared`). `verify=False`: this job has already verified the step
    folder `path` (pass the folder this returned, so a moved `latest` cannot swap it)."""
    folder = resolve_folder(path)
    kind = folder_kind(folder)
    if kind == "step" and verify:  # a corrupt checkpoint is named before its tensors are judged
        if all_ranks and dist.is_available() and dist.is_initialized():
            verify_shared(folder)
        else:
            verify_step_folder(folder)
    cfg = read_folder_config(folder, kind)
    check_folder(folder, kind, cfg)
    return folder, kind, cfg


def verify_shared(step_dir: Path) -> None:
    """`verify_step_folder` split over the ranks of the default group: each checksums its share
    of the files (every file is read once per job, in 1 / world size of the time), and every
    rank raises the first problem any rank found, so a corrupt folder is the same one-line
    error everywhere and no rank goes on into a collective read. The manifest and the shard
    headers are small and every rank reads them (their checks come out the same on each)."""
    manifest = read_manifest(step_dir)
    rank, size = dist.get_rank(), dist.get_world_size()
    problems = [None] * size
    mine = sorted(manifest["files"])[rank::size]
    dist.all_gather_object(problems, check_files(step_dir, manifest, mine))
    raise_problem(step_dir, next((p for p in problems if p), None))
    metadata = CheckpointReader(step_dir / DCP_DIR).read_metadata()
    raise_problem(step_dir, check_tensors(manifest, metadata))


# --------------------------------------------------------------------------------------------
# Streaming full tensors


def iter_weights(path: str | Path) -> tuple[Config, Iterator[tuple[str, torch.Tensor]]]:
    """(config, iterator of (native name, full tensor)) for a native or Hugging Face model folder,
    a training run folder or a checkpoint step folder."""
    folder, kind, cfg = open_weights(path)
    if kind == "step":
        cfg, tensors = iter_checkpoint_weights(folder, verify=False)
        if cfg.finetune.lora_rank:
            tensors = merge_lora(cfg, tensors, read_lora(folder))
        return cfg, tensors
    if kind == "native":
        return iter_model_folder(folder)
    return cfg, hf_to_native(cfg.model, iter_safetensors(folder))


def read_lora(step_dir: Path) -> dict[str, torch.Tensor]:
    """The full LoRA tensors of a step folder (small: read whole, without a process group)."""
    cfg = checkpoints.read_config(step_dir)
    reader = CheckpointReader(step_dir / DCP_DIR)
    metadata = reader.read_metadata().state_dict_metadata
    out = {}
    for name in lora_shapes(cfg):
        meta = metadata[f"model.{name}"]
        out[name] = torch.empty(meta.size, dtype=meta.properties.dtype)
    dcp_load({f"model.{n}": t for n, t in out.items()}, reader, step_dir, single_process=True)
    return out


@torch.no_grad()
def load_weights_into(model: torch.nn.Module, tensors) -> None:
    """Copy full, unpadded tensors (what `iter_weights` yields) into a model built on one
    process; rows of a padded vocabulary past the stored ones are zero."""
    params = dict(model.named_parameters())
    for name, tensor in tensors:
        param = params[name]
        param[: tensor.shape[0]].copy_(tensor)
        param[tensor.shape[0]:].zero_()


# --------------------------------------------------------------------------------------------
# Filling a (tensor-parallel) model in place, reading only this rank's slices


@torch.no_grad()
def load_weights(model: GPT, path: str | Path, grid=None, verify: bool = True) -> Config:
    """Fill `model` (built for `model.cfg`, possibly split by `parallelize` over `grid` and cut to
    a rank's pipeline stages by `split_model`) from the folder at `path`; returns the folder's
    config. The source must have the whole model's tensors and shapes; only vocabulary rows may
    differ, and only within the padding (rows past `model.cfg.vocab_size` are zero). Under an
    initialised process group every rank calls this (step folders are read collectively).
    `verify=False`: this job has already verified the step folder `path` (see `open_weights`)."""
    folder, kind, source = open_weights(path, all_ranks=True, verify=verify)
    check_fits(model, folder, source)
    if kind == "step":
        _load_step_folder(model, folder, grid)
        if source.finetune.lora_rank:
            _merge_lora_into(model, folder, source)
    else:
        _load_safetensors(model, folder, kind, source)
    return source


def check_fits(model: GPT, folder: Path, source: Config) -> None:
    """The source (config `source`) has exactly the tensors and shapes of the whole model
    `model` is (a part of), except that vocabulary tensors may have any row count from
    `vocab_size` up to the padded one. Every pipeline stage checks the whole model, so all ranks
    agree on the verdict."""
    stored, target = native_shapes(source), model.cfg
    hint = _differing_keys(source, target)
    for name, full in whole_model_shapes(model).items():
        have = stored.pop(name, None)
        if have is None:
            raise UserError(f"{folder}: has no tensor {name}, which the model needs{hint}")
        if have == full:
            continue
        if name not in VOCAB_PADDED:
            raise UserError(f"{folder}: tensor {name} has shape {have}, the model {full}{hint}")
        if have[1:] != full[1:] or not target.vocab_size <= have[0] <= full[0]:
            raise UserError(f"{folder}: tensor {name} has shape {have}, the model {full} (vocabulary "
                            f"rows may differ only within the padding){hint}")
    if stored:
        raise UserError(f"{folder}: tensor {sorted(stored)[0]} is not part of the model{hint}")
    for key in _HEAD_LAYOUT:
        if getattr(source.model, key) != getattr(target, key):
            raise UserError(f"{folder}: model.{key} is {getattr(source.model, key)!r}, the config's "
                            f"{getattr(target, key)!r}: the attention weights would be misread")


def whole_model_shapes(model: GPT) -> dict[str, tuple[int, ...]]:
    """Parameter name -> full (padded, unsplit) shape for every parameter of the whole model
    that `model` is, or is a tensor-parallel slice or some pipeline stages of; no adapters."""
    with torch.device("meta"):
        whole = GPT(model.cfg, padded_vocab_size=model.padded_vocab_size)
    return {name: tuple(p.shape) for name, p in whole.named_parameters()}


def _differing_keys(source: Config, target) -> str:
    keys = [f"model.{key}: {getattr(source.model, key)!r} there, {getattr(target, key)!r} here"
            for key in _SHAPE_KEYS if getattr(source.model, key) != getattr(target, key)]
    return f" ({'; '.join(keys)})" if keys else ""


def _load_safetensors(model: GPT, folder: Path, kind: str, source: Config) -> None:
    headers = read_headers(folder)
    origins = native_origins(source.model) if kind == "hf" else {}
    with contextlib.ExitStack() as stack:
        files = {}

        def piece(name: str):
            file = headers[name][0]
            if file not in files:
                files[file] = stack.enter_context(open_safetensors(file))
            return files[file].get_slice(name)

        for name, param in _base_parameters(model):
            hf_names, make, pos = origins.get(name, ((name,), None, 0))
            sources = [(n, headers[n][1][0]) for n in hf_names]
            slices = tuple(getattr(param, "shard_slices", ()))
            rows, rest = (slices[0] if slices else slice(None)), slices[1:]
            full_rows = getattr(param, "full_shape", param.shape)[0]
            wanted = _source_rows(sources, make, pos, full_rows)[rows]
            # Rows past the vocabulary (or past the stored rows, -1) are padding: zero. They
            # come last, so the real rows are a prefix of this rank's part.
            real = int(((wanted >= 0) & (wanted < model.cfg.vocab_size)).sum()) \
                if name in VOCAB_PADDED else len(wanted)
            param[real:].zero_()
            if real:
                param[:real].copy_(_gather_rows(piece, sources, wanted[:real], rest))


def _source_rows(sources, make, pos, full_rows: int) -> torch.Tensor:
    """For each row of the native tensor, the row of the concatenated sources it comes from
    (found by running the packing function on row numbers); -1 past the stored rows."""
    offsets = torch.tensor([0] + [rows for _, rows in sources]).cumsum(0)
    numbers = [torch.arange(offsets[j], offsets[j + 1]) for j in range(len(sources))]
    index = numbers[0] if make is None else make(*numbers)[pos]
    out = torch.full((full_rows,), -1, dtype=torch.long)
    out[: len(index)] = index
    return out


def _gather_rows(piece, sources, wanted: torch.Tensor, rest: tuple) -> torch.Tensor:
    """Rows `wanted` of the concatenated sources (columns `rest`), reading from each source only
    the span of rows between the first and the last one needed."""
    parts, positions, base, offset = [], torch.empty_like(wanted), 0, 0
    for name, rows in sources:
        mine = (wanted >= offset) & (wanted < offset + rows)
        if mine.any():
            local = wanted[mine] - offset
            lo, hi = int(local.min()), int(local.max()) + 1
            parts.append(piece(name)[(slice(lo, hi), *rest)])
            positions[mine] = local - lo + base
            base += hi - lo
        offset += rows
    return torch.cat(parts)[positions]


def _load_step_folder(model: GPT, step_dir: Path, grid) -> None:
    """DCP reads, for a tensor described by its global shape and this rank's shard (a DTensor),
    only the stored pieces that overlap the shard. Vocabulary tensors stored at another padding
    are read whole, one at a time, and their real rows copied. Each read is collective: every
    rank walks the same re-padded names, also a pipeline stage that holds none of them."""
    reader = CheckpointReader(step_dir / DCP_DIR)
    metadata = reader.read_metadata().state_dict_metadata
    distributed = dist.is_available() and dist.is_initialized()
    params = dict(_base_parameters(model))
    repadded = [name for name, full in whole_model_shapes(model).items()
                if tuple(metadata[f"model.{name}"].size) != full]
    same = {}
    for name, param in params.items():
        if name in repadded:
            continue
        if grid is not None and grid.tp > 1:
            same[f"model.{name}"] = to_dtensor(param.detach(), param, grid)
        else:
            same[f"model.{name}"] = param.detach()
    dcp_load(same, reader, step_dir, single_process=not distributed)
    for name in repadded:
        meta, param = metadata[f"model.{name}"], params.get(name)
        whole = {} if param is None else {
            f"model.{name}": torch.empty(meta.size, dtype=meta.properties.dtype)}
        dcp_load(whole, reader, step_dir, single_process=not distributed)
        if param is None:  # a stage without this tensor, there for the collective read
            continue
        start = getattr(param, "shard_slices", (slice(0, None),))[0].start or 0
        real = max(0, min(param.shape[0], model.cfg.vocab_size - start))
        param.zero_()
        param[:real].copy_(whole[f"model.{name}"][start:start + real])


def _merge_lora_into(model: GPT, step_dir: Path, source: Config) -> None:
    """Add the adapters of a LoRA checkpoint to the base weights just loaded from it, each rank
    its own slice of every update."""
    lora = read_lora(step_dir)
    params = dict(model.named_parameters())
    for name, (a, b) in adapted_weights(source).items():
        if name in params:  # a pipeline stage holds only its blocks
            param = params[name]
            update = delta(source, lora[a], lora[b])[tuple(getattr(param, "shard_slices", ()))]
            param.add_(update.to(param.device, param.dtype))


def _base_parameters(model: GPT):
    """The model's parameters other than its own LoRA adapters (which no base model holds)."""
    return [(name, p) for name, p in model.named_parameters() if not is_lora(name)]
