"""Hugging Face conversion both ways, proven by matching logits with transformers."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM, Starcoder2Config, Starcoder2ForCausalLM

import starcoder
from starcoder.convert.export import from_hf, to_hf
from starcoder.convert.sharded import INDEX_NAME, ShardedWriter, iter_safetensors

VOCAB = 1000  # not a multiple of 128: the native model pads to 1024


def tiny_hf(kind):
    torch.manual_seed({"mqa": 0, "mha": 1, "sc2": 2, "sc2-untied": 3}[kind])
    if kind in ("mqa", "mha"):
        config = GPTBigCodeConfig(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                  multi_query=kind == "mqa", bos_token_id=0, eos_token_id=0,
                                  activation_function="gelu_pytorch_tanh" if kind == "mqa" else "gelu")
        model = GPTBigCodeForCausalLM(config)
    else:
        config = Starcoder2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  sliding_window=8, rope_theta=10000.0, bos_token_id=0, eos_token_id=0,
                                  tie_word_embeddings=kind == "sc2")
        model = Starcoder2ForCausalLM(config)
    with torch.no_grad():  # transformers zeroes biases at init; random ones test their mapping too
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.02)
    return model.eval()


IDS = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["mqa", "mha", "sc2", "sc2-untied"])
def test_round_trip_matches_transformers_logits(kind, tmp_path):
    hf = tiny_hf(kind)
    hf.save_pretrained(tmp_path / "hf")
    from_hf(tmp_path / "hf", tmp_path / "native")
    ours = starcoder.load_model(tmp_path / "native")
    assert ours.padded_vocab_size == 1024
    with torch.no_grad():
        ref = hf(IDS).logits
        got = ours(IDS)
    assert got.shape == ref.shape == (2, 40, VOCAB)
    assert ref.std() > 0.01  # not a degenerate model
    assert (got - ref).abs().max() <= 1e-4

    to_hf(tmp_path / "native", tmp_path / "back")
    back = type(hf).from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert (back(IDS).logits - ref).abs().max() <= 1e-4
    original = dict(iter_safetensors(tmp_path / "hf"))
    for name, tensor in iter_safetensors(tmp_path / "back"):
        assert torch.equal(tensor, original[name]), name
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["vocab_size"] == VOCAB and config["bos_token_id"] == 0
    if kind.startswith("sc2"):
        assert config["sliding_window"] == 8 and config["rope_parameters"]["rope_theta"] == 10000.0
        assert config["hidden_act"] == "gelu_pytorch_tanh"
    else:
        assert config["activation_function"] == ("gelu_pytorch_tanh" if kind == "mqa" else "gelu")


def test_a_wrong_mapping_would_be_caught(tmp_path):
    """The logit comparison has teeth: dropping the sliding window changes the logits."""
    hf = tiny_hf("sc2")
    hf.save_pretrained(tmp_path / "hf")
    from_hf(tmp_path / "hf", tmp_path / "native")
    ours = starcoder.load_model(tmp_path / "native")
    for block in ours.blocks.values():
        block.attn.window = None
    with torch.no_grad():
        assert (ours(IDS) - hf(IDS).logits).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["mqa", "sc2-untied"])
def test_sharded_bf16_checkpoints_keep_dtype(kind, tmp_path):
    hf = tiny_hf(kind).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / INDEX_NAME).is_file()
    subprocess.run([sys.executable, "-m", "starcoder", "convert", "from-hf", "--model", str(tmp_path / "hf"),
                    "--output", str(tmp_path / "native"), "--max-shard-size", "64KiB"], check=True)
    index = json.loads((tmp_path / "native" / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert all(t.dtype == torch.bfloat16 for _, t in iter_safetensors(tmp_path / "native"))
    ours = starcoder.load_model(tmp_path / "native", dtype=torch.float32)
    ref_model = type(hf).from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (ours(IDS) - ref_model(IDS).logits).abs().max() <= 1e-4
    assert starcoder.load_model(tmp_path / "native").embedding.word.weight.dtype == torch.bfloat16

    subprocess.run([sys.executable, "-m", "starcoder", "convert", "to-hf", "--checkpoint", str(tmp_path / "native"),
                    "--output", str(tmp_path / "back"), "--max-shard-size", "100KB"], check=True)
    original = dict(iter_safetensors(tmp_path / "hf"))
    back = dict(iter_safetensors(tmp_path / "back"))
    assert back.keys() == original.keys() - ({"lm_head.weight"} if kind == "mqa" else set())
    for name, tensor in back.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, original[name]), name
    assert json.loads((tmp_path / "back" / "config.json").read_text())["torch_dtype"] == "bfloat16"


MEMORY_PROBE = textwrap.dedent("""
    import json, sys
    import starcoder.convert.export as export

    def status_kib(field):  # VmHWM is this process's own peak (ru_maxrss can carry the parent's)
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])

    baseline = status_kib("VmRSS")
    export.from_hf(sys.argv[1], sys.argv[2], max_shard_size="64MiB")
    export.to_hf(sys.argv[2], sys.argv[3], max_shard_size="64MiB")
    print(json.dumps({"baseline_kib": baseline, "peak_kib": status_kib("VmHWM")}))
""")


def test_conversion_streams_with_bounded_memory(tmp_path):
    """A >1 GiB sharded bf16 StarCoder2 checkpoint converts both ways with peak RSS growth under
    25% of the model size."""
    config = Starcoder2Config(vocab_size=16384, hidden_size=2048, intermediate_size=8192, num_hidden_layers=13,
                              num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=4096,
                              tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in Starcoder2ForCausalLM(config).named_parameters()}
    source = tmp_path / "hf"
    gen = torch.Generator().manual_seed(0)
    with ShardedWriter(source, "64MiB") as writer:
        for name, shape in shapes.items():
            writer.add(name, torch.randn(shape, generator=gen, dtype=torch.float32).to(torch.bfloat16))
    (source / "config.json").write_text(json.dumps(config.to_dict()))
    model_bytes = writer.total_bytes
    assert model_bytes >= 1024**3

    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(source), str(tmp_path / "native"),
                          str(tmp_path / "back")], capture_output=True, text=True, check=True).stdout
    probe = json.loads(out.strip().splitlines()[-1])
    growth = (probe["peak_kib"] - probe["baseline_kib"]) * 1024
    assert growth < 0.25 * model_bytes, f"peak RSS grew by {growth / 2**20:.0f} MiB for a {model_bytes / 2**20:.0f} MiB model"
    # and the result is right: spot-check two tensors
    back = dict(iter_safetensors(tmp_path / "back"))
    original = dict(iter_safetensors(source))
    for name in ("model.layers.12.self_attn.k_proj.weight", "lm_head.weight"):
        assert torch.equal(back[name], original[name])


def test_weight_io_imports_only_downward():
    """convert/ (weight I/O) sits below the trainer and the public face: nothing in it imports
    starcoder.api, starcoder.training or starcoder.cli, and only the top imports api."""
    import ast
    from pathlib import Path

    root = Path(starcoder.__file__).parent

    def imports(path):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                yield node.module
            elif isinstance(node, ast.Import):
                yield from (alias.name for alias in node.names)

    for path in (root / "convert").glob("*.py"):
        bad = [m for m in imports(path) if m.startswith(("starcoder.api", "starcoder.training", "starcoder.cli"))]
        assert not bad, (path.name, bad)
    for path in root.rglob("*.py"):
        if path.parent not in (root, root / "cli"):  # the top: api.py, the package, the CLI
            assert not [m for m in imports(path) if m == "starcoder.api"], path
