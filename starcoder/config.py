"""The whole run configuration as validated dataclasses.

One YAML file holds five sections (`model`, `parallel`, `data`, `train`, `log`); any key can be
overridden on the command line with `--set section.key=value` (the value is parsed as YAML, so
`--set model.sliding_window=null` works). Every problem is reported as a `ConfigError` whose
one-line message starts with the offending key, e.g.
`model.num_attention_heads: 12 is not divisible by model.num_query_groups (5)`.

Like Megatron-Core's `TransformerConfig`, the schema is defined once here; behaviour lives
elsewhere. Checks that need the world size (data-parallel divisibility) happen at launch.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import re

import yaml

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` (no dot) as a string; learning rates are written that way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """`line L, column C: problem` from a PyYAML error, in one line."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(getattr(err, "problem", None) or err).split())


class UserError(ValueError):
    """A user's mistake (a bad path, file or value): the CLI prints the message as one line and
    exits 2. The message names the file or key."""


class ConfigError(UserError):
    """A bad configuration value; the message names the key."""


@dataclass
class ModelConfig:
    # `gpt_bigcode` = StarCoder / SantaCoder (HF GPTBigCodeForCausalLM), `starcoder2` = StarCoder2.
    architecture: Literal["gpt_bigcode", "starcoder2"] = "starcoder2"
    num_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 8
    # KV heads: 1 = multi-query, == num_attention_heads = multi-head, in between = grouped-query.
    num_query_groups: int = 2
    ffn_hidden_size: Optional[int] = None  # None -> 4 * hidden_size
    vocab_size: int = 8192  # the tokenizer's real vocabulary; never changed by padding
    make_vocab_size_divisible_by: int = 128  # Megatron's padding rule (times tensor_parallel)
    max_position_embeddings: int = 256
    position_embedding: Literal["learned", "rope"] = "rope"
    rope_theta: float = 10000.0
    # A query sees the `sliding_window` most recent positions including itself (transformers'
    # convention; flash-attn writes this (W-1, 0)). None = full causal attention.
    sliding_window: Optional[int] = None
    activation: Literal["gelu_tanh", "gelu"] = "gelu_tanh"
    layernorm_epsilon: float = 1e-5
    tie_word_embeddings: bool = True
    init_method_std: float = 0.02
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0  # after the attention and MLP output projections
    embedding_dropout: float = 0.0
    bos_token_id: int = 0
    eos_token_id: int = 0
    # Kernel backend: `torch` (PyTorch ops, any device), `triton` (hand-written kernels, GPUs and
    # the Triton interpreter), `auto` (Triton on CUDA, torch elsewhere).
    kernels: Literal["auto", "torch", "triton"] = "auto"
    # Activation recomputation in backward (docs/training.md): `selective` keeps the GEMM and
    # attention outputs and recomputes the memory-bound ops between them (LayerNorm, GeLU, bias
    # adds, dropout masks, RoPE); `full` keeps only each block's input and recomputes the block.
    # (`none` rather than `off`: YAML reads a bare off as false.)
    recompute: Literal["none", "selective", "full"] = "none"
    # With recompute full: recompute only the first N blocks of each model chunk (pipeline stage
    # or virtual stage); the others save everything. None: every block.
    recompute_layers: Optional[int] = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    def padded_vocab_size(self, tensor_parallel: int = 1) -> int:
        multiple = self.make_vocab_size_divisible_by * tensor_parallel
        return -(-self.vocab_size // multiple) * multiple


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    # Blocks per pipeline stage, in stage order (P x V entries summing to model.num_layers);
    # None splits evenly. Megatron-style uneven stages give the embedding / head stages fewer.
    pipeline_layers: Optional[list[int]] = None
    virtual_pipeline: int = 1  # model chunks per pipeline rank (interleaved / zero-bubble)
    # auto: interleaved when virtual_pipeline > 1, else 1f1b. zero_bubble: ZB-V placement at V 2.
    pipeline_schedule: Literal["auto", "1f1b", "interleaved", "zero_bubble", "gpipe"] = "auto"
    sequence_parallel: bool = False
    # Megatron's distributed optimizer: gradients reduce-scattered, fp32 main weights and Adam
    # state for each rank's 1/DP slice of every bucket, updated weights all-gathered.
    distributed_optimizer: bool = False
    # Let the all-gather of updated weights overlap the next forward (distributed optimizer).
    overlap_param_gather: bool = False
    # Accumulate and reduce gradients in fp32 under bf16/fp16 (Megatron's default); false: in the
    # weights' dtype.
    grad_reduce_in_fp32: bool = True
    # Gradient bucket size for data-parallel reductions. 160 MB (Megatron's 40M fp32 elements):
    # StarCoder2-15B at TP 4 has 16 GB of fp32 gradients per rank, ~100 buckets rather than DDP's
    # 25 MB default's ~640 latency-bound inter-node reductions, still enough to overlap backward.
    ddp_bucket_mb: float = 160.0
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: NCCL on GPUs, gloo on CPU
    # A collective that waits longer than this fails on every rank (exit non-zero, so a batch
    # script can requeue), instead of gloo's and NCCL's 30 minutes. Above one checkpoint save.
    collective_timeout_s: float = 600.0


@dataclass
class DataSource:
    path: str  # prefix of a .bin/.idx pair (without extension)
    weight: float = 1.0


@dataclass
class DataConfig:
    # tokenizer.json, a sentencepiece model, a folder holding one, or `builtin:tiny`.
    tokenizer: Optional[str] = None
    paths: list[DataSource] = field(default_factory=list)  # weighted blend for training
    # Megatron-style train/valid/test split of every source, e.g. "98,2,0".
    split: str = "98,2,0"
    cache_dir: Optional[str] = None  # index cache; None -> beside the data, or output_dir if read-only
    fim_rate: float = 0.0
    fim_spm_rate: float = 0.5
    # StarCoder2 repository-level FIM: split FIM'd documents on this token, then FIM each fragment.
    fim_split_sample: Optional[str] = None
    fragment_fim_rate: float = 0.5
    mask_eod_loss: bool = False  # StarCoder trained with these tokens in the loss
    mask_fim_pad_loss: bool = False
    num_workers: int = 2
    # Fine-tuning data (preprocessed with --format instruct/commit/chat): several examples per
    # sequence (best fit over a seeded shuffle) instead of one example padded to the sequence.
    pack: bool = False
    # Give each micro-batch "document_ids" so attention stops at example (or, for pretraining
    # data, EOD) boundaries. None: on when packing fine-tuning data, else off.
    document_mask: Optional[bool] = None


@dataclass
class TrainConfig:
    seq_length: int = 256  # tokens per sample; may be below max_position_embeddings
    global_batch_size: int = 8
    micro_batch_size: int = 8
    max_steps: int = 100
    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    # Warmup as a fraction of the run (ceil(ratio x max_steps) steps, as transformers rounds);
    # instead of warmup_steps.
    warmup_ratio: Optional[float] = None
    # Passes over fine-tuning data: max_steps becomes ceil(epochs x rows per epoch (examples, or
    # packed sequences) / global_batch_size), computed at start-up (train.max_steps is not used).
    epochs: Optional[int] = None
    # `lm`: loss on every token; `sft`: only on the tokens the fine-tuning data's loss mask marks
    # (responses and their closing EOS); `dpo`: the sigmoid DPO loss on preference pairs
    # (`--format preference` data; batch sizes count pairs; keys in the finetune section).
    objective: Literal["lm", "sft", "dpo"] = "lm"
    # `token`: mean over the global batch's loss tokens; `example`: each example's mean over its
    # own loss tokens, then the mean over examples (OctoPack's norm_target_loss; fine-tuning data).
    loss_normalization: Literal["token", "example"] = "token"
    lr_decay_steps: Optional[int] = None  # None -> max_steps
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPUs, fp32 on CPU
    initial_loss_scale: float = 65536.0  # fp16 only
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False
    save_every: int = 0  # 0: only at the end
    keep_last: Optional[int] = None  # prune older checkpoints; None keeps all
    verify_checksums: bool = True  # on resume; costs one read of the checkpoint files
    output_dir: str = "runs/default"
    seed: int = 1234
    init_from: Optional[str] = None  # weights only: a native model folder, checkpoint or HF model
    eval_every: int = 0  # 0: no periodic validation
    eval_steps: int = 4
    # Greedy HumanEval pass@1 of the live model every N steps (0: never; generated code runs in
    # the bubblewrap sandbox, see docs/eval.md); on the first `eval_humaneval_limit` problems.
    eval_humaneval_every: int = 0
    eval_humaneval_limit: Optional[int] = None  # None: all 164
    max_nonfinite_steps: int = 10  # skipped non-finite steps tolerated before the run stops
    # [a, b]: a torch.profiler trace (and on CUDA a memory snapshot) of steps a..b, written to
    # <output_dir>/profile/. None: no profiling.
    profile_steps: Optional[list[int]] = None


@dataclass
class LogConfig:
    every: int = 10
    tensorboard: bool = True
    wandb: bool = False  # offline unless WANDB_API_KEY is set
    wandb_project: str = "starcoder"
    wandb_run_name: Optional[str] = None
    progress_bar: Optional[bool] = None  # None: on when stderr is a terminal
    peak_tflops: Optional[float] = None  # overrides the GPU table used for MFU


# The model's projections LoRA can adapt (`finetune.lora_targets`); docs/finetune.md maps them to
# the Hugging Face names.
LORA_TARGETS = ("q_proj", "kv_proj", "out_proj", "fc_in", "fc_out")


@dataclass
class FinetuneConfig:
    # LoRA rank r (0: off, every weight trains). With r > 0 only the adapters train, on top of the
    # base model `train.init_from` names.
    lora_rank: int = 0
    lora_alpha: float = 16.0  # the adapter's update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.05  # dropout on the adapter's input (PEFT's lora_dropout)
    # Projections to adapt: q_proj, kv_proj (together one adapter over [q; kv], GPTBigCode's
    # c_attn), out_proj, fc_in, fc_out. The default is Astraios' c_attn, c_proj (both).
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "kv_proj", "out_proj", "fc_out"])
    # DPO (train.objective dpo): beta scales the implicit reward beta x (log pi - log pi_ref).
    dpo_beta: float = 0.1
    # cDPO's label smoothing e: the loss is -(1-e) log sigma(beta D) - e log sigma(-beta D).
    dpo_label_smoothing: float = 0.0
    # The reference policy: `frozen` runs the initial model (with LoRA, the base without adapters)
    # beside the policy; `precomputed` runs it once over the training pairs before step 1.
    dpo_reference: Literal["frozen", "precomputed"] = "frozen"


def _check_finetune(cfg: "Config", need) -> None:
    f = cfg.finetune
    need(f.lora_rank >= 0, "finetune.lora_rank", f"must be at least 0 (0: off), got {f.lora_rank}")
    need(f.lora_alpha > 0, "finetune.lora_alpha", f"must be positive, got {f.lora_alpha}")
    need(0.0 <= f.lora_dropout < 1.0, "finetune.lora_dropout", f"must be in [0, 1), got {f.lora_dropout}")
    for target in f.lora_targets:
        need(target in LORA_TARGETS, "finetune.lora_targets",
             f"{target!r} is not one of {', '.join(LORA_TARGETS)}")
    need(len(set(f.lora_targets)) == len(f.lora_targets), "finetune.lora_targets", "lists a projection twice")
    if f.lora_rank:
        need(bool(f.lora_targets), "finetune.lora_targets", "empty: LoRA needs at least one projection")
        need(cfg.train.init_from is not None, "finetune.lora_rank",
             "LoRA adapts a trained model: set train.init_from to the base model")
    need(f.dpo_beta > 0, "finetune.dpo_beta", f"must be positive, got {f.dpo_beta}")
    need(0.0 <= f.dpo_label_smoothing < 0.5, "finetune.dpo_label_smoothing",
         f"must be in [0, 0.5), got {f.dpo_label_smoothing}")
    if cfg.train.objective == "dpo":
        need(not cfg.data.pack, "data.pack", "train.objective dpo reads each pair as two padded "
             "rows (chosen, rejected); packing is not available, set false")
        need(cfg.parallel.pipeline_parallel == 1, "parallel.pipeline_parallel",
             "train.objective dpo is not available under pipeline parallelism (the schedule's loss "
             "is per token, DPO's per pair); use 1")
        need(cfg.train.loss_normalization == "token", "train.loss_normalization",
             "train.objective dpo averages over pairs; leave it at token")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> "Config":
        _validate(self)
        return self


def accumulation_steps(train: TrainConfig, dp_size: int) -> int:
    """Micro-batches per rank per step: global / (micro x data parallel), which must divide."""
    per_step = train.micro_batch_size * dp_size
    if train.global_batch_size % per_step:
        raise ConfigError(f"train.global_batch_size: {train.global_batch_size} is not divisible by "
                          f"train.micro_batch_size x data-parallel size ({train.micro_batch_size} x "
                          f"{dp_size})")
    return train.global_batch_size // per_step


# --------------------------------------------------------------------------------------------
# Loading


def load_config(source: str | Path | dict | None = None, overrides: list[str] | None = None) -> Config:
    """Build a validated Config from a YAML file, a preset name (`tiny-sc2`), or a dict."""
    raw: dict[str, Any] = {}
    if isinstance(source, dict):
        raw = source
    elif source is not None:
        raw = read_config_file(resolve_config_path(source))
    return config_from_dict(apply_overrides(raw, overrides)).validate()


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """`--set section.key=value` items written into the raw sections (values parsed as YAML)."""
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        section, _, name = key.strip().partition(".")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{section}: expected a mapping")
        try:
            raw[section][name] = parse_yaml(value) if value.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item}: the value is not valid YAML ({_yaml_problem(err)}); "
                              "quote strings that hold YAML syntax") from None
    return raw


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start} is {err.object[err.start]:#04x}); "
                          "a config is a UTF-8 YAML file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
    try:
        raw = parse_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(err)})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def resolve_config_path(source: str | Path) -> Path:
    path = Path(source)
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{source}.yaml"
    if preset.is_file():
        return preset
    presets = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
    raise ConfigError(f"config {source}: no such file or preset (presets: {presets})")


def config_from_dict(raw: dict[str, Any], cls: type = None):
    """A config of sections (`Config`, or another dataclass of section dataclasses) from raw
    YAML values; not yet validated."""
    cls = cls or Config
    sections = {f.name: f.type for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = set(raw) - set(sections)
    if unknown:
        name = sorted(unknown)[0]
        raise ConfigError(f"{name}: unknown section{_suggest(name, sections)}")
    kwargs = {}
    for name, value in raw.items():
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping of keys, got {value!r}")
        kwargs[name] = _build(hints[name], value, name)
    return cls(**kwargs)


def _build(cls: type, values: dict[str, Any], prefix: str):
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"{prefix}.{key}: unknown key{_suggest(key, known)}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}.{key}")
    return cls(**kwargs)


def _suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is Literal:
        if value not in args:
            choices = " | ".join(map(str, args))
            raise ConfigError(f"{key}: {value!r} is not one of {choices}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is DataSource:
        return _data_source(value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")  # a schema bug, not user input


def _data_source(value: Any, key: str) -> DataSource:
    """`path`, `"weight path"` or `{path: ..., weight: ...}`."""
    if isinstance(value, str):
        parts = value.split()
        if len(parts) == 2 and _is_number(parts[0]):
            return _check_weight(DataSource(path=parts[1], weight=float(parts[0])), key)
        return DataSource(path=value)
    if isinstance(value, dict):
        return _check_weight(_build(DataSource, value, key), key)
    raise ConfigError(f"{key}: expected a path or {{path, weight}}, got {value!r}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_weight(source: DataSource, key: str) -> DataSource:
    if not (source.weight > 0 and math.isfinite(source.weight)):
        raise ConfigError(f"{key}.weight: must be a positive finite number, got {source.weight}")
    return source


# --------------------------------------------------------------------------------------------
# Validation: everything that can be checked without the world size.


def need(ok: bool, key: str, why: str) -> None:
    """The check every config validator makes: a false `ok` is an error naming `key`."""
    if not ok:
        raise ConfigError(f"{key}: {why}")


def _validate(cfg: Config) -> None:
    m, p, d, t, lg = cfg.model, cfg.parallel, cfg.data, cfg.train, cfg.log

    for key in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                "vocab_size", "make_vocab_size_divisible_by", "max_position_embeddings"):
        need(getattr(m, key) >= 1, f"model.{key}", f"must be at least 1, got {getattr(m, key)}")
    need(m.ffn_hidden_size is None or m.ffn_hidden_size >= 1, "model.ffn_hidden_size",
         f"must be at least 1, got {m.ffn_hidden_size}")
    need(m.hidden_size % m.num_attention_heads == 0, "model.hidden_size",
         f"{m.hidden_size} is not divisible by model.num_attention_heads ({m.num_attention_heads})")
    need(m.num_attention_heads % m.num_query_groups == 0, "model.num_attention_heads",
         f"{m.num_attention_heads} is not divisible by model.num_query_groups ({m.num_query_groups})")
    need(m.sliding_window is None or m.sliding_window >= 1, "model.sliding_window",
         f"must be at least 1 (or null for full attention), got {m.sliding_window}")
    need(m.rope_theta > 0, "model.rope_theta", f"must be positive, got {m.rope_theta}")
    need(m.position_embedding != "rope" or m.head_dim % 2 == 0, "model.hidden_size",
         f"RoPE needs an even head dimension, got {m.head_dim}")
    need(m.layernorm_epsilon > 0, "model.layernorm_epsilon", "must be positive")
    need(m.init_method_std > 0, "model.init_method_std", "must be positive")
    for key in ("attention_dropout", "hidden_dropout", "embedding_dropout"):
        need(0.0 <= getattr(m, key) < 1.0, f"model.{key}", f"must be in [0, 1), got {getattr(m, key)}")
    for key in ("bos_token_id", "eos_token_id"):
        need(0 <= getattr(m, key) < m.vocab_size, f"model.{key}",
             f"{getattr(m, key)} is outside the vocabulary (model.vocab_size {m.vocab_size})")
    if m.recompute_layers is not None:
        need(0 <= m.recompute_layers <= m.num_layers, "model.recompute_layers",
             f"must be in [0, model.num_layers ({m.num_layers})] or null, got {m.recompute_layers}")
        need(m.recompute == "full", "model.recompute_layers",
             f"applies to model.recompute: full only (got {m.recompute}); set it to null")
    # The zero-bubble split backward runs each block's backward in two passes; selective
    # checkpointing hands its saved outputs out once.
    need(m.recompute != "selective" or cfg.parallel.pipeline_parallel == 1
         or cfg.parallel.pipeline_schedule != "zero_bubble", "model.recompute",
         "selective cannot run under parallel.pipeline_schedule: zero_bubble (its split backward "
         "goes through each block twice); use full or none")
    if m.architecture == "gpt_bigcode":
        need(m.position_embedding == "learned", "model.position_embedding",
             "gpt_bigcode (StarCoder) uses learned positions; use architecture starcoder2 for RoPE")
        need(m.num_query_groups in (1, m.num_attention_heads), "model.num_query_groups",
             f"gpt_bigcode supports multi-query (1) or multi-head ({m.num_attention_heads}), "
             f"got {m.num_query_groups}")
        need(m.sliding_window is None, "model.sliding_window", "gpt_bigcode has no sliding window")
        need(m.tie_word_embeddings, "model.tie_word_embeddings", "gpt_bigcode always ties the output layer")
    else:
        need(m.position_embedding == "rope", "model.position_embedding", "starcoder2 uses rope")

    tp = p.tensor_parallel
    need(tp >= 1, "parallel.tensor_parallel", f"must be at least 1, got {tp}")
    need(p.collective_timeout_s > 0, "parallel.collective_timeout_s",
         f"must be positive (seconds), got {p.collective_timeout_s}")
    need(p.pipeline_parallel >= 1, "parallel.pipeline_parallel", f"must be at least 1, got {p.pipeline_parallel}")
    need(p.ddp_bucket_mb > 0, "parallel.ddp_bucket_mb", f"must be positive, got {p.ddp_bucket_mb}")
    need(m.num_attention_heads % tp == 0, "parallel.tensor_parallel",
         f"model.num_attention_heads ({m.num_attention_heads}) is not divisible by {tp}")
    need(m.ffn_size % tp == 0, "parallel.tensor_parallel",
         f"the FFN size ({m.ffn_size}) is not divisible by {tp}")
    need(m.num_query_groups % tp == 0 or tp % m.num_query_groups == 0, "parallel.tensor_parallel",
         f"{tp} must divide model.num_query_groups ({m.num_query_groups}) or be a multiple of it")
    _check_pipeline(p, m.num_layers, need)
    need(not p.sequence_parallel or t.seq_length % tp == 0, "parallel.sequence_parallel",
         f"train.seq_length ({t.seq_length}) must be divisible by parallel.tensor_parallel ({tp})")

    for key in ("fim_rate", "fim_spm_rate", "fragment_fim_rate"):
        need(0.0 <= getattr(d, key) <= 1.0, f"data.{key}", f"must be in [0, 1], got {getattr(d, key)}")
    need(d.num_workers >= 0, "data.num_workers", f"must be at least 0, got {d.num_workers}")
    _check_split(d.split)

    need(t.seq_length >= 1, "train.seq_length", f"must be at least 1, got {t.seq_length}")
    need(t.seq_length <= m.max_position_embeddings, "train.seq_length",
         f"{t.seq_length} exceeds model.max_position_embeddings ({m.max_position_embeddings})")
    need(t.micro_batch_size >= 1, "train.micro_batch_size", f"must be at least 1, got {t.micro_batch_size}")
    need(t.global_batch_size % t.micro_batch_size == 0, "train.global_batch_size",
         f"{t.global_batch_size} is not divisible by train.micro_batch_size ({t.micro_batch_size})")
    need(t.global_batch_size >= 1, "train.global_batch_size", "must be at least 1")
    need(t.max_steps >= 1, "train.max_steps", f"must be at least 1, got {t.max_steps}")
    need(t.lr >= 0, "train.lr", f"must be non-negative, got {t.lr}")
    need(0 <= t.min_lr <= t.lr, "train.min_lr", f"{t.min_lr} must be in [0, train.lr ({t.lr})]")
    need(t.warmup_steps >= 0, "train.warmup_steps", "must be non-negative")
    need(t.warmup_ratio is None or 0 <= t.warmup_ratio < 1, "train.warmup_ratio",
         f"must be in [0, 1), got {t.warmup_ratio}")
    need(t.warmup_ratio is None or t.warmup_steps == 0, "train.warmup_ratio",
         f"set train.warmup_steps ({t.warmup_steps}) or train.warmup_ratio, not both")
    need(t.epochs is None or t.epochs >= 1, "train.epochs", f"must be at least 1 (or null), got {t.epochs}")
    need(t.lr_decay_steps is None or t.lr_decay_steps >= 1, "train.lr_decay_steps", "must be at least 1")
    need(t.weight_decay >= 0, "train.weight_decay", "must be non-negative")
    need(0 <= t.adam_beta1 < 1, "train.adam_beta1", f"must be in [0, 1), got {t.adam_beta1}")
    need(0 <= t.adam_beta2 < 1, "train.adam_beta2", f"must be in [0, 1), got {t.adam_beta2}")
    need(t.adam_eps > 0, "train.adam_eps", "must be positive")
    need(t.grad_clip >= 0, "train.grad_clip", "must be non-negative (0 disables clipping)")
    need(t.initial_loss_scale > 0, "train.initial_loss_scale", "must be positive")
    need(t.save_every >= 0, "train.save_every", "must be non-negative (0: only at the end)")
    need(t.keep_last is None or t.keep_last >= 1, "train.keep_last", "must be at least 1 (or null)")
    need(t.eval_every >= 0, "train.eval_every", "must be non-negative")
    need(t.eval_steps >= 1, "train.eval_steps", "must be at least 1")
    need(t.eval_humaneval_every >= 0, "train.eval_humaneval_every", "must be non-negative (0: never)")
    need(t.eval_humaneval_limit is None or 1 <= t.eval_humaneval_limit <= 164,
         "train.eval_humaneval_limit", f"must be in [1, 164] (or null), got {t.eval_humaneval_limit}")
    need(t.max_nonfinite_steps >= 0, "train.max_nonfinite_steps", "must be non-negative")
    steps = t.profile_steps
    need(steps is None or (len(steps) == 2 and 1 <= steps[0] <= steps[1]), "train.profile_steps",
         f"expected [first, last] steps with 1 <= first <= last, got {steps}")
    need(lg.every >= 1, "log.every", f"must be at least 1, got {lg.every}")
    need(lg.peak_tflops is None or lg.peak_tflops > 0, "log.peak_tflops", "must be positive")
    _check_finetune(cfg, need)


def _check_split(split: str) -> None:
    parts = split.replace("/", ",").split(",")
    try:
        weights = [float(x) for x in parts]
    except ValueError:
        raise ConfigError(f"data.split: expected numbers like '98,2,0', got {split!r}") from None
    if len(weights) > 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"data.split: expected up to three non-negative weights, got {split!r}")


def _check_pipeline(p: ParallelConfig, num_layers: int, need) -> None:
    """Layouts the pipeline cannot run fail here, naming the key. The micro-batch count (which
    depends on the data-parallel size) is checked when the trainer starts."""
    pp, v = p.pipeline_parallel, p.virtual_pipeline
    need(v >= 1, "parallel.virtual_pipeline", f"must be at least 1, got {v}")
    need(v == 1 or pp > 1, "parallel.virtual_pipeline",
         f"{v} model chunks per rank need parallel.pipeline_parallel > 1")
    stages = pp * v
    if p.pipeline_layers is None:
        need(num_layers % stages == 0, "parallel.pipeline_parallel",
             f"model.num_layers ({num_layers}) does not split evenly into pipeline_parallel x "
             f"virtual_pipeline ({pp} x {v}) stages; set parallel.pipeline_layers")
    else:
        layers = p.pipeline_layers
        need(len(layers) == stages, "parallel.pipeline_layers",
             f"needs one entry per stage (pipeline_parallel x virtual_pipeline = {stages}), "
             f"got {len(layers)}")
        need(all(n >= 1 for n in layers), "parallel.pipeline_layers",
             f"every stage needs at least one block, got {layers}")
        need(sum(layers) == num_layers, "parallel.pipeline_layers",
             f"{layers} sums to {sum(layers)}, not model.num_layers ({num_layers})")
    schedule = p.pipeline_schedule
    need(schedule != "interleaved" or v > 1, "parallel.pipeline_schedule",
         "interleaved needs parallel.virtual_pipeline > 1")
    need(schedule not in ("1f1b", "gpipe") or v == 1, "parallel.pipeline_schedule",
         f"{schedule} runs one model chunk per rank (parallel.virtual_pipeline 1, got {v}); "
         "use interleaved or zero_bubble")
