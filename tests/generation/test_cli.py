"""`starcoder generate`: completions, infills, prompt files, bad input."""

import json

from tests.eval.test_humaneval import run_cli, starcoder_cli


def test_generate_prompt_prompts_file_and_fim(tiny_models, tmp_path):
    model = tiny_models["sc2"]["native"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps("def f():\n") + "\n" + json.dumps({"prompt": "import re\n"}) + "\n")
    r = starcoder_cli("generate", "--model", model, "--prompts", prompts, "--max-new-tokens", 5,
                      "--n-samples", 2, "--temperature", 0.8, "--json")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert [(x["prompt"], x["sample"]) for x in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]

def test_generate_fim_from_a_hugging_face_folder(tiny_models, capsys):
    code, out, err = run_cli(capsys, "generate", "--model", tiny_models["sc1"]["hf"], "--fim-prefix",
                             "def f(x):\n    ", "--fim-suffix", "\n    return y\n", "--max-new-tokens", 5)
    assert code == 0, err
    assert out.count("def f(x):") == 1 and "return y" in out and "<fim_" not in out


def test_generate_bad_input_is_one_line(tiny_models, tmp_path, capsys):
    model = tiny_models["sc2"]["native"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    for args, words in ([["--prompts", bad], f"--prompts: {bad}:1"],
                        [["--prompt", "x", "--top-p", "0"], "--top-p"],
                        [["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"],
                        [["--fim-prefix", "x"], "--fim-prefix: needs --fim-suffix"]):
        code, _, err = run_cli(capsys, "generate", "--model", model, *args)
        assert code == 2 and err.startswith("error: ") and words in err, err
    code, _, err = run_cli(capsys, "generate", "--model", tmp_path / "nothing", "--prompt", "x")
    assert code == 2 and err.startswith("error: --model:")
