"""`starcoder preprocess`: tokenise JSON lines / Parquet into Megatron .bin/.idx files."""

from __future__ import annotations

import argparse

from starcoder.config import UserError

EPILOG = """\
formats:
  plain     content + <|endoftext|>
  sc1-meta  StarCoder: "<reponame>REPO<filename>PATH<gh_stars>STARS\\n" + content, each of the
            three fields with probability 0.2 (stars as buckets 0, 1-10, 10-100, 100-1000, 1000+)
  sc2-repo  StarCoder2: one document per repository, its files in random order, each after
            <file_sep>; with probability 0.5 "<repo_name>REPO" first and "PATH\\n" before each file.
            Input need not be grouped by repository: it is grouped through on-disk hash partitions
            (bounded by --group-memory-mb); pass --input-grouped to stream already grouped input.

fine-tuning formats (also write PREFIX_loss_mask.bin/.idx: 1 where a token carries the loss, which
is on the response and the closing <|endoftext|> only):
  instruct    instruction, response through --template (default StarCoder2-Instruct's: the system
              line, then "\n\n### Instruction\n{instruction}\n\n### Response\n{response}")
  commit      CommitPackFT's old_file, old_contents, subject (or message), new_contents as OctoPack:
              [<filename>NAME]<commit_before>OLD<commit_msg> (filename with probability 0.5,
              --meta-prob), target SUBJECT<commit_after>NEW<|endoftext|>; needs StarCoder's
              special tokens unless --commit-markers text
  chat        messages ([{role, content}]) through the tokenizer folder's chat template
              (chat_template.jinja or tokenizer_config.json), else --chat-template, else a default
              in the instruct layout; every assistant turn carries the loss
  preference  prompt, chosen, rejected: one document of two sequences (chosen, rejected) per pair,
              the prompt through --template

Output: PREFIX.bin and PREFIX.idx (megatron-core's mmap format, uint16 tokens when the vocabulary
fits) and PREFIX.json (this report). Random draws are seeded per document, so the files are
byte-identical for any --workers. Bad records and damaged files are counted and reported;
a run that would write no document writes nothing and exits 2 with the reason (e.g. "use
--json-key text"). Documents of any length are tokenised in bounded memory.

example:
  starcoder preprocess --input data/the-stack-python/ --tokenizer path/to/tokenizer.json \\
      --output-prefix data/python --format sc1-meta --workers 8
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--input", required=True, nargs="+", metavar="PATH",
                        help="JSON lines (.jsonl/.json/.ndjson, optionally .gz or .zst), Parquet, or "
                             "folders of them (searched recursively, read in sorted order)")
    parser.add_argument("--tokenizer", required=True, metavar="SPEC",
                        help="tokenizer.json, sentencepiece .model, a folder holding one, or builtin:tiny")
    parser.add_argument("--output-prefix", required=True, metavar="PREFIX",
                        help="write PREFIX.bin, PREFIX.idx and PREFIX.json (the report)")
    parser.add_argument("--format", default="plain",
                        choices=("plain", "sc1-meta", "sc2-repo", "instruct", "commit", "chat",
                                 "preference"),
                        help="document format (see below; default: plain)")
    parser.add_argument("--json-key", default="content", metavar="KEY",
                        help="field holding the document text (default: content)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="tokenizer processes, one thread each (default: 1, in this process)")
    parser.add_argument("--repo-key", metavar="KEY",
                        help="repository name field (default: max_stars_repo_name for sc1-meta, "
                             "repo_name for sc2-repo)")
    parser.add_argument("--path-key", metavar="KEY",
                        help="file path field (default: max_stars_repo_path for sc1-meta, path for sc2-repo)")
    parser.add_argument("--stars-key", metavar="KEY",
                        help="star count field for sc1-meta (default: max_stars_count)")
    parser.add_argument("--meta-prob", type=float, metavar="P",
                        help="probability of each metadata field (sc1-meta, default 0.2), of the "
                             "metadata form of a repository (sc2-repo, default 0.5) or of the "
                             "filename part (commit, default 0.5)")
    parser.add_argument("--seed", type=int, default=1234,
                        help="seed of the per-document random draws (default: 1234)")
    parser.add_argument("--escape-special-tokens", action="store_true",
                        help="encode literal special-token strings found in the text (e.g. "
                             "'<|endoftext|>' inside a source file) as plain text instead of as "
                             "special tokens; they are counted either way")
    parser.add_argument("--input-grouped", action="store_true",
                        help="sc2-repo: the files of each repository are contiguous in the input; "
                             "stream them instead of grouping first")
    parser.add_argument("--group-memory-mb", type=float, default=1024, metavar="MB",
                        help="sc2-repo: memory for grouping files by repository; larger inputs are "
                             "spilled to hash partitions beside the output (default: 1024)")
    parser.add_argument("--template", metavar="TEXT",
                        help="instruct/preference: the prompt layout, with {instruction} once and "
                             "ending in {response} (default: StarCoder2-Instruct's)")
    parser.add_argument("--chat-template", metavar="FILE",
                        help="chat: a Jinja chat template file, used instead of the tokenizer "
                             "folder's (default: the folder's, else the documented default)")
    parser.add_argument("--commit-markers", choices=("tokens", "text"), default="tokens",
                        help="commit: <commit_before>, <commit_msg>, <commit_after>, <filename> as "
                             "special tokens (the tokenizer must have them) or spelled as text")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from starcoder.data.preprocess import preprocess_corpus

    if args.workers < 1:
        raise UserError(f"--workers: must be at least 1, got {args.workers}")
    chat_template = None
    if args.chat_template:
        try:
            chat_template = open(args.chat_template, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"--chat-template {args.chat_template}: cannot read ({err})") from None
    report = preprocess_corpus(
        args.input, args.tokenizer, args.output_prefix, fmt=args.format, json_key=args.json_key,
        workers=args.workers, repo_key=args.repo_key, path_key=args.path_key,
        stars_key=args.stars_key, meta_prob=args.meta_prob, seed=args.seed,
        escape_special_tokens=args.escape_special_tokens, input_grouped=args.input_grouped,
        group_memory_mb=args.group_memory_mb, template=args.template, chat_template=chat_template,
        commit_markers=args.commit_markers, progress=False if args.no_progress else None)
    print(report.summary())
    return 0
