"""Greedy generation equals `transformers` on the exported model, the text API's rules, and a
step folder is checksummed once per load."""

import re

import pytest
import torch

from starcoder.convert.checkpoints import latest_checkpoint, read_manifest
from starcoder.generation import Sampling, cut_at_stop, load_generator
from starcoder.training.trainer import train
from tests.eval.test_humaneval import run_cli
from tests.training.helpers import checksummed_files, corrupt_copy, make_corpus, tiny_config

PROMPTS = ["def add(a, b):\n    return", "import os\n", "class Stack:\n    def push(self, item):\n        self."]


@pytest.mark.parametrize("family", ["sc1", "sc2"])
def test_greedy_equals_transformers_generate(tiny_models, family):
    transformers = pytest.importorskip("transformers")
    paths = tiny_models[family]
    ours = load_generator(paths["native"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(paths["hf"]).eval()
    # 80 new tokens: past tiny-sc2's sliding window of 64.
    new = 80
    for prompt in PROMPTS:
        ids = ours.tokenizer.encode(prompt)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
        got = ours.complete([prompt], max_new_tokens=new)[0]
        # Ours stops at end tokens; transformers was told not to, so compare up to the first.
        assert got.tokens == ref[: len(got.tokens)]
        assert len(got.tokens) == new or got.tokens[-1] in ours.stop_ids
    # Batched (left-padded) generation gives the same tokens as one prompt at a time.
    batched = ours.complete(PROMPTS, max_new_tokens=new, batch_size=3)
    alone = [ours.complete([p], max_new_tokens=new)[0] for p in PROMPTS]
    assert [c.tokens for c in batched] == [c.tokens for c in alone]


def test_loads_hf_folders_and_run_folders_alike(tiny_models):
    a = load_generator(tiny_models["sc2"]["native"]).complete(PROMPTS[:1], max_new_tokens=8)
    b = load_generator(tiny_models["sc2"]["hf"]).complete(PROMPTS[:1], max_new_tokens=8)
    assert a[0].tokens == b[0].tokens


def test_long_prompts_are_cut_from_the_left_and_full_ones_reported(tiny_models):
    gen = load_generator(tiny_models["sc1"]["native"])
    ctx = gen.context
    fits = "x = 1\n" * 10
    full = "x" * 0 + " ".join(["a"] * (ctx + 40))  # more tokens than the context
    out = gen.complete([fits, full], max_new_tokens=4)
    assert not out[0].truncated and not out[0].too_long and out[0].tokens
    assert out[1].truncated and out[1].too_long and out[1].text == ""


def test_sampling_is_seeded(tiny_models):
    gen = load_generator(tiny_models["sc2"]["native"])
    s = Sampling(temperature=1.0, top_p=0.95, seed=7)
    a = gen.complete([PROMPTS[0]] * 3, max_new_tokens=12, sampling=s)
    b = gen.complete([PROMPTS[0]] * 3, max_new_tokens=12, sampling=s)
    assert [c.tokens for c in a] == [c.tokens for c in b]
    assert len({tuple(c.tokens) for c in a}) > 1  # samples differ from one another


def test_stop_sequences_cut_the_text():
    assert cut_at_stop("    return 1\ndef f():\n", ["\ndef", "\nclass"]) == "    return 1"
    assert cut_at_stop("abc", ["\n#"]) == "abc"


def test_rows_that_fill_the_context_finish_while_others_go_on(tiny_models):
    gen = load_generator(tiny_models["sc2"]["native"])
    ctx = gen.context
    near_full = " ".join(["a"] * 400)
    ids = gen.tokenizer.encode(near_full)[-(ctx - 3):]  # room for 3 new tokens
    prompt = gen.tokenizer.decode(ids)
    assert len(gen.tokenizer.encode(prompt)) == ctx - 3
    out = gen.complete([prompt, "def f():\n"], max_new_tokens=10, batch_size=2)
    assert len(out[0].tokens) <= 3 and not out[0].too_long
    assert out[1].tokens == gen.complete(["def f():\n"], max_new_tokens=10)[0].tokens


def test_a_step_folder_is_checksummed_once_and_a_corrupt_one_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(make_corpus(tmp_path / "corpus", files=2), run, "train.max_steps=1"))
    step = latest_checkpoint(run)
    with checksummed_files(step) as read:
        load_generator(step)
    assert sorted(read) == sorted(read_manifest(step)["files"])  # each file once, not twice

    corrupt = corrupt_copy(step, tmp_path / "corrupt")
    code, _, err = run_cli(capsys, "generate", "--model", corrupt, "--prompt", "x")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.match(rf"error: --model: {re.escape(str(corrupt))}: corrupt checkpoint: ", err), err
