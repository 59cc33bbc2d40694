"""The data path: tokenizer, preprocessing to Megatron `.bin/.idx`, FIM, blended datasets, loader.

Three entry points (imported lazily, so `import starcoder.data` does not import torch):

- `load_tokenizer(spec)`: a `Tokenizer` from a tokenizer.json, a sentencepiece `.model`, a folder
  holding one, or `builtin:tiny`.
- `preprocess_corpus(inputs, tokenizer_spec, output_prefix, ...)`: JSON lines / Parquet to
  `{output_prefix}.bin/.idx` (the API behind `starcoder preprocess`).
- `build_train_loader(cfg, tokenizer, ...)` / `build_valid_loader(...)`: micro-batches.

Everything else lives in the submodules: `tokenizer`, `corpus`, `formats`, `preprocess`, `indexed`
(the file format), `helpers` (C++ index builders and gather, with Python references), `dataset`
(indices, caching, blends), `fim`, `loader`. User documentation: docs/data.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Optional

if TYPE_CHECKING:  # pragma: no cover
    from starcoder.config import Config
    from starcoder.data.preprocess import PreprocessReport
    from starcoder.data.tokenizer import Tokenizer


def load_tokenizer(spec: str) -> "Tokenizer":
    """Load a tokenizer.

    `spec` is a `tokenizer.json` path, a sentencepiece `.model`, a folder holding one (tokenizer.json
    preferred), or `builtin:tiny` (vocabulary 8192, StarCoder2's special tokens at ids 0-37, shipped
    in the package).

    The returned `Tokenizer` has:
    - `encode(text) -> list[int]`: no special tokens added; literal special-token strings in the
      text become their ids (the `tokenizers` default). `encode_batch(texts)` for many.
    - `decode(ids) -> str`: the raw `tokenizers` decode, special tokens kept as text, no clean-up.
    - `token_to_id(token) -> int | None`, `vocab_size`, `eod_id` (`<|endoftext|>`),
      `special_tokens` (content -> id).
    - `fim_id("prefix" | "middle" | "suffix" | "pad")` and `fim_ids()` (all four): StarCoder's
      `<fim_prefix>` family or SantaCoder's `<fim-prefix>` family; a `MissingTokenError`
      (a ValueError) names the missing token. `require(token, why)` does the same for any token.
    - `save(folder) -> Path`: copies the tokenizer file (tokenizer.json or tokenizer.model) into
      `folder`, byte-identical to what was loaded, for checkpoints and model folders.
    """
    from starcoder.data.tokenizer import load_tokenizer as impl

    return impl(spec)


def preprocess_corpus(inputs, tokenizer_spec: str, output_prefix: str, fmt: str = "plain",
                      json_key: str = "content", workers: int = 1, **options) -> "PreprocessReport":
    """Tokenise a corpus into `{output_prefix}.bin` and `{output_prefix}.idx` (plus a
    `{output_prefix}.json` copy of the report).

    `inputs`: a path or a list of paths: JSON lines (`.jsonl`/`.json`/`.ndjson`, optionally `.gz` or
    `.zst`), Parquet, or folders of them (read recursively, sorted by path). `fmt`:
    - `plain`: `content` + `<|endoftext|>`;
    - `sc1-meta`: StarCoder's `<reponame>R<filename>P<gh_stars>S\\n` prefix, each field with
      probability 0.2 (`meta_prob`), keys `repo_key`/`path_key`/`stars_key` (default The Stack v1's
      `max_stars_repo_name`, `max_stars_repo_path`, `max_stars_count`);
    - `sc2-repo`: one document per repository, files in random order each after `<file_sep>`, with
      `<repo_name>R` and `path\\n` included with probability 0.5 (`meta_prob`); keys `repo_key`
      (`repo_name`) and `path_key` (`path`). Input need not be grouped by repository: it is grouped
      through on-disk hash partitions within `group_memory_mb`; `input_grouped=True` streams instead
      (a repository split across the input then becomes several documents);
    - fine-tuning formats `instruct` (`instruction`, `response`, through `template`, default
      StarCoder2-Instruct's), `commit` (CommitPackFT fields in OctoPack's layout; `commit_markers`
      "tokens" or "text"), `chat` (`messages`, through the tokenizer folder's chat template, else
      `chat_template`, else the default) and `preference` (`prompt`, `chosen`, `rejected`: one
      document of two sequences per pair). They also write `{output_prefix}_loss_mask.bin/.idx`,
      uint8 with the same sizes, 1 on the response tokens and closing EOS (docs/data.md).

    Random draws are seeded per document from `seed`, so the files are byte-identical for any
    `workers` (processes that tokenise, one tokenizer thread each). Tokens are uint16 when the
    vocabulary has fewer than 65500 entries, else int32, one sequence per document (megatron-core
    reads them). Bad records (invalid JSON or UTF-8, missing key) and empty documents are skipped
    and counted; literal special-token strings in the text are counted and encoded as special tokens
    unless `escape_special_tokens=True`. Other options: `repo_key`, `path_key`, `stars_key`,
    `meta_prob`, `seed`, `escape_special_tokens`, `input_grouped`, `group_memory_mb`, `template`,
    `chat_template` (the template's text), `commit_markers`, `chunk_bytes`, `progress` (None: a
    tqdm bar when stderr is a terminal).

    Returns a `PreprocessReport` (`.prefix`, `.documents`, `.tokens`, `.bad_records` by reason,
    `.bad_examples`, `.empty_documents`, `.special_token_strings`, `.summary()`). An interrupted
    run leaves no `.idx`, so a partial output never looks complete.
    """
    from starcoder.data.preprocess import preprocess_corpus as impl

    return impl(inputs, tokenizer_spec, output_prefix, fmt=fmt, json_key=json_key, workers=workers,
                **options)


def build_train_loader(cfg: "Config", tokenizer: "Tokenizer", *, dp_rank: int, dp_size: int,
                       consumed_samples: int) -> Iterator[dict]:
    """An endless iterator of this data-parallel rank's training micro-batches.

    Each micro-batch is a dict:
    - `tokens`: LongTensor [train.micro_batch_size, train.seq_length + 1]; the trainer shifts it
      (inputs `tokens[:, :-1]`, labels `tokens[:, 1:]`).
    - `loss_mask`: float32 [micro_batch_size, seq_length], ones except, with `data.mask_eod_loss`,
      positions whose input token is EOD (Megatron's rule) and, with `data.mask_fim_pad_loss`,
      positions whose label is `<fim_pad>`.
    - `document_ids` (with `data.document_mask`): LongTensor [micro_batch_size, seq_length + 1],
      nondecreasing per row: the example (fine-tuning data) or EOD-ended document (pretraining)
      each token belongs to. The trainer passes `document_ids[:, :-1]` to the model.

    Fine-tuning data (sources with a loss mask, from `preprocess_corpus(fmt="instruct" | "commit"
    | "chat")`) gives rows of examples instead of Megatron windows (starcoder.data.packing): one
    example padded with EOD, or several packed with `data.pack`; `loss_mask` is the stored mask
    under `train.objective: sft` (1 / the example's loss tokens with `train.loss_normalization:
    example`), and 0 on padding and across example boundaries.

    Order (Megatron's `MegatronPretrainingSampler`): the global batch of step g is stream samples
    consumed_samples + g*global_batch_size ... + global_batch_size - 1; every micro_batch_size *
    dp_size consecutive samples form one micro-step and rank r takes [r*micro, (r+1)*micro). The
    same global batches come out for any dp_size, and resuming is calling this again with the
    checkpoint's `consumed_samples`. The index holds train.max_steps * train.global_batch_size
    samples; the stream wraps around after that (epoch + 1, new FIM draws).

    Data: `data.paths` (weighted blend, Megatron's `data.split` of each source's documents),
    shuffled as megatron-core's GPTDataset does, with our own seeded shuffles (`train.seed`).
    Indices are built once by global rank 0 behind a `torch.distributed` barrier when a process
    group exists (so call this on every rank), cached in `data.cache_dir` (default: `index_cache`
    beside the first source, or `train.output_dir/index_cache` when that folder is read-only) and
    rebuilt only when a source file or a setting they depend on changes.

    FIM (`data.fim_rate` > 0; `data.fim_split_sample` for repository-level FIM) is applied per
    sample with draws keyed on (train.seed, split, epoch, sample index): identical for any
    `data.num_workers` (DataLoader worker processes, used when FIM is on) and across resume.
    Raises ConfigError naming the key for missing data, splits without documents, a FIM token
    the tokenizer lacks, or settings the kind of data does not support.
    """
    from starcoder.data.loader import build_train_loader as impl

    return impl(cfg, tokenizer, dp_rank=dp_rank, dp_size=dp_size, consumed_samples=consumed_samples)


def build_valid_loader(cfg: "Config", tokenizer: "Tokenizer", *, dp_rank: int,
                       dp_size: int) -> Optional[Iterator[dict]]:
    """A fresh iterator over this rank's validation micro-batches: the first
    train.eval_steps * train.global_batch_size samples of the validation split (same ordering,
    dict layout and FIM as `build_train_loader`, keyed on the validation split), so every call
    yields the same batches. None when `data.split` gives validation no documents."""
    from starcoder.data.loader import build_valid_loader as impl

    return impl(cfg, tokenizer, dp_rank=dp_rank, dp_size=dp_size)


def resolve_epochs(cfg: "Config") -> "Config":
    """`cfg` with `train.max_steps` computed from `train.epochs` (ceil(epochs x rows of the
    fine-tuning data's training split / train.global_batch_size)); `cfg` itself without it."""
    from starcoder.data.loader import resolve_epochs as impl

    return impl(cfg)


def document_mask_enabled(cfg: "Config") -> bool:
    """Whether micro-batches carry `document_ids`: `data.document_mask`, by default on when
    packing fine-tuning data (reads the sources' PREFIX.json)."""
    from starcoder.data.loader import document_mask_enabled as impl

    return impl(cfg)


__all__ = ["load_tokenizer", "preprocess_corpus", "build_train_loader", "build_valid_loader",
           "resolve_epochs", "document_mask_enabled"]
