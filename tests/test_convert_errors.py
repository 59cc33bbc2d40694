"""Conversion never leaves a broken or stale model behind: bad input is one line and exit code 2,
nothing is written, a good earlier output survives, a re-export replaces the whole folder and
files follow the umask."""

import json
import os
import shutil
import stat
import subprocess

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Starcoder2Config, Starcoder2ForCausalLM

import starcoder
from starcoder.cli import main
from starcoder.convert.export import from_hf, to_hf
from starcoder.convert.sharded import INDEX_NAME, iter_safetensors


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny sharded Starcoder2 model (2 KV heads, untied head) in Hugging Face layout."""
    torch.manual_seed(0)
    config = Starcoder2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                              tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    folder = tmp_path_factory.mktemp("hf") / "model"
    Starcoder2ForCausalLM(config).save_pretrained(folder, max_shard_size="100KB")
    assert (folder / INDEX_NAME).is_file()
    return folder


@pytest.fixture(scope="module")
def native_folder(hf_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("native") / "model"
    from_hf(hf_folder, out)
    return out


def copy(folder, tmp_path, name="src"):
    return shutil.copytree(folder, tmp_path / name)


def shard_of(folder, tensor):
    return folder / json.loads((folder / INDEX_NAME).read_text())["weight_map"][tensor]


def rewrite_shard(path, edit):
    with safe_open(path, framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def edit_config(folder, edit):
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


K0 = "model.layers.0.self_attn.k_proj.weight"

# (name, how to break a copy of the HF folder, words the one-line message must contain)
BAD_HF = [
    ("config-not-json", lambda d: (d / "config.json").write_text("{not json"), ["config.json"]),
    ("unknown-model-type", lambda d: edit_config(d, lambda c: c.update(model_type="llama")),
     ["config.json", "llama"]),
    ("config-missing-key", lambda d: edit_config(d, lambda c: c.pop("hidden_size")),
     ["config.json", "hidden_size"]),
    ("shapes-disagree", lambda d: edit_config(d, lambda c: c.update(num_key_value_heads=4)),
     ["model.layers.0.self_attn.k_proj.", "(32,", "implies (64,"]),
    ("more-layers-than-weights", lambda d: edit_config(d, lambda c: c.update(num_hidden_layers=3)),
     ["model.layers.2."]),
    ("fewer-layers-than-weights", lambda d: edit_config(d, lambda c: c.update(num_hidden_layers=1)),
     ["model.layers.1."]),
    ("missing-shard", lambda d: shard_of(d, K0).unlink(), ["model-0", ".safetensors", "missing"]),
    ("tensor-missing-from-shard", lambda d: rewrite_shard(shard_of(d, K0), lambda t: t.pop(K0)), [K0]),
    ("extra-tensor", lambda d: rewrite_shard(shard_of(d, K0), lambda t: t.update(stray=torch.zeros(2))),
     ["stray"]),
    ("mis-shaped-tensor", lambda d: rewrite_shard(shard_of(d, K0), lambda t: t.update({K0: t[K0][:8]})),
     [K0, "(8, 64)"]),
    ("truncated-shard", lambda d: shard_of(d, K0).write_bytes(shard_of(d, K0).read_bytes()[:20]),
     ["model-0", ".safetensors"]),
    ("int-weights", lambda d: rewrite_shard(shard_of(d, K0), lambda t: t.update({K0: t[K0].to(torch.int32)})),
     [K0, "int32"]),
    ("not-a-model", lambda d: [p.unlink() for p in list(d.iterdir())], ["src"]),
]


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line(code, err, words):
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: "), err
    for word in words:
        assert str(word) in err, (word, err)


@pytest.mark.parametrize("name, breaks, words", BAD_HF, ids=[c[0] for c in BAD_HF])
def test_bad_hugging_face_folders_are_one_line_and_write_nothing(hf_folder, tmp_path, capsys, name, breaks, words):
    source = copy(hf_folder, tmp_path)
    breaks(source)
    out = tmp_path / "out"
    code, err = run_cli(capsys, "convert", "from-hf", "--model", str(source), "--output", str(out))
    assert_one_line(code, err, words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no temporary folder


def test_bad_paths_and_options_are_one_line(native_folder, tmp_path, capsys):
    cases = [
        (["from-hf", "--model", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")], ["nowhere"]),
        (["to-hf", "--checkpoint", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")], ["nowhere"]),
        (["to-hf", "--checkpoint", str(native_folder), "--output", str(tmp_path / "o"),
          "--max-shard-size", "lots"], ["--max-shard-size", "lots"]),
    ]
    (tmp_path / "file").write_text("keep me")
    cases.append((["to-hf", "--checkpoint", str(native_folder), "--output", str(tmp_path / "file")], ["file"]))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    cases.append((["to-hf", "--checkpoint", str(native_folder), "--output", str(tmp_path / "notes")], ["notes"]))
    broken = copy(native_folder, tmp_path, "broken")
    (broken / "config.yaml").write_text("model: [1, 2\n")
    cases.append((["to-hf", "--checkpoint", str(broken), "--output", str(tmp_path / "o")], ["config.yaml"]))
    lacking = copy(native_folder, tmp_path, "lacking")
    rewrite_shard(lacking / "model.safetensors", lambda t: t.pop("blocks.1.attn.kv_proj.weight"))
    cases.append((["to-hf", "--checkpoint", str(lacking), "--output", str(tmp_path / "o")],
                  ["blocks.1.attn.kv_proj.weight is missing"]))
    for argv, words in cases:
        code, err = run_cli(capsys, "convert", *argv)
        assert_one_line(code, err, words)
    assert not (tmp_path / "o").exists()
    assert (tmp_path / "file").read_text() == "keep me"
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_a_failed_conversion_keeps_the_good_output(hf_folder, tmp_path, capsys):
    out = tmp_path / "out"
    from_hf(hf_folder, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    source = copy(hf_folder, tmp_path)
    rewrite_shard(shard_of(source, K0), lambda t: t.pop(K0))
    code, err = run_cli(capsys, "convert", "from-hf", "--model", str(source), "--output", str(out))
    assert_one_line(code, err, [K0])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_a_re_export_replaces_the_whole_folder(native_folder, tmp_path, capsys):
    """Finding 2: a sharded export, then a single-file one into the same folder, must not leave
    the old index that readers follow."""
    out = tmp_path / "hf"
    to_hf(native_folder, out, max_shard_size="64KiB", dtype=torch.float32, progress=True)
    assert "to-hf: 100%" in capsys.readouterr().err  # the bar counts every tensor
    assert (out / INDEX_NAME).is_file()
    to_hf(native_folder, out, dtype=torch.bfloat16)
    assert not (out / INDEX_NAME).exists()
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert {t.dtype for _, t in iter_safetensors(out)} == {torch.bfloat16}
    assert starcoder.load_model(out).embedding.word.weight.dtype == torch.bfloat16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_exported_files_follow_the_umask(native_folder, tmp_path, umask):
    old = os.umask(umask)
    try:
        to_hf(native_folder, tmp_path / "hf", max_shard_size="64KiB")
        from_hf(tmp_path / "hf", tmp_path / "native")
    finally:
        os.umask(old)
    for folder in (tmp_path / "hf", tmp_path / "native"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
        for path in folder.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


def test_the_folders_of_a_killed_conversion_are_cleaned_up(hf_folder, native_folder, tmp_path, capsys):
    """A conversion killed while writing leaves `.NAME.tmp-PID`; one killed between its two final
    renames leaves the previous output set aside as `.NAME.old-PID`. The next conversion into
    the same output removes the first and puts the second back, even when it fails itself."""
    dead = _dead_pid()
    out = tmp_path / "out"
    shutil.copytree(native_folder, tmp_path / f".out.old-{dead}")
    (tmp_path / f".out.tmp-{dead}").mkdir()
    source = copy(hf_folder, tmp_path)
    rewrite_shard(shard_of(source, K0), lambda t: t.pop(K0))
    code, err = run_cli(capsys, "convert", "from-hf", "--model", str(source), "--output", str(out))
    assert_one_line(code, err, [K0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == \
        {p.name: p.read_bytes() for p in native_folder.iterdir()}


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid
