"""`starcoder convert to-hf | from-hf`: streaming conversion with Hugging Face models."""

from __future__ import annotations

import argparse

import torch

from starcoder.convert.export import adapter_to_peft, from_hf, to_hf

REPLACED = ("written aside and put in place whole once complete: replaces an earlier export, is "
            "left as it was if the conversion fails")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    to = sub.add_parser("to-hf", help="native model folder or checkpoint -> Hugging Face folder",
                        description="Write GPTBigCodeForCausalLM (StarCoder) or Starcoder2ForCausalLM "
                                    "safetensors, config.json, tokenizer and generation config.")
    to.add_argument("--checkpoint", required=True, metavar="DIR",
                    help="a native model folder, a training run folder (follows `latest`) or a step folder")
    to.add_argument("--output", required=True, metavar="DIR", help=REPLACED)
    to.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="cast floating tensors (default: keep the stored dtype)")
    to.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    to.add_argument("--adapter-only", action="store_true",
                    help="a LoRA run's checkpoint -> a PEFT adapter folder (adapter_config.json, "
                         "adapter_model.safetensors) for the exported base; without it a LoRA "
                         "checkpoint exports merged weights")
    frm = sub.add_parser("from-hf", help="Hugging Face folder -> native model folder",
                         description="Read a GPTBigCode or Starcoder2 model folder (safetensors) and "
                                     "write a native model folder that load_model and train.init_from read.")
    frm.add_argument("--model", required=True, metavar="DIR", help="a local Hugging Face model folder")
    frm.add_argument("--output", required=True, metavar="DIR", help=REPLACED)
    frm.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")


def run(args) -> int:
    if args.direction == "to-hf" and args.adapter_only:
        out = adapter_to_peft(args.checkpoint, args.output, DTYPES[args.dtype] if args.dtype else None)
    elif args.direction == "to-hf":
        out = to_hf(args.checkpoint, args.output, args.max_shard_size,
                    DTYPES[args.dtype] if args.dtype else None)
    else:
        out = from_hf(args.model, args.output, args.max_shard_size)
    print(f"wrote {out}")
    return 0
