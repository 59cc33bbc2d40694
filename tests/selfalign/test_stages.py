"""The generation stages against a scripted backend: the prompts they build (prefix + query), the
stop sequences, prompts that do not fit, empty outputs, the judge's vote, and counts that add up."""

import pytest

from starcoder.selfalign import stages
from starcoder.selfalign.backends import Output
from starcoder.selfalign.config import GenerationStageConfig, SeedsConfig, TasksConfig


class Scripted:
    """Answers each prompt with `reply(prompt, sample)`; a token is a character."""

    def __init__(self, reply, context=400):
        self.reply, self.context, self.calls = reply, context, []

    def count_tokens(self, texts):
        return [len(t) for t in texts]

    def generate(self, prompts, samples, max_new_tokens, temperature, top_p, seed, stop):
        self.calls.append(dict(prompts=prompts, samples=samples, max_new_tokens=max_new_tokens,
                               temperature=temperature, seed=seed, stop=stop))
        return [[Output(self.reply(p, i), 3) for i in range(samples)] for p in prompts]


@pytest.fixture
def prompt(tmp_path):
    path = tmp_path / "prefix.txt"
    path.write_text("PREFIX\n\n")
    return str(path)


def test_concepts_prompt_is_prefix_then_query_and_long_ones_are_counted(prompt):
    seeds = [{"seed": "def f(x):\n    return x\n"}, {"seed": "def g(y):\n" + "    y += 1\n" * 60}]
    backend = Scripted(lambda p, i: "" if i == 1 else "recursion, lists\nstray")
    cfg = GenerationStageConfig(prompt=prompt, samples=2, max_new_tokens=100)
    out, report = stages.concepts(seeds, backend, cfg, seed=7)
    (call,) = backend.calls
    assert call["prompts"] == ["PREFIX\n\n### Snippet\ndef f(x):\n    return x\n\n### Concepts\n"]
    assert call["stop"] == ["\n### "] and call["seed"] == 7 and call["samples"] == 2
    assert [r["concepts"] for r in out] == ["recursion, lists"]  # the first line only
    assert report.records_in == 4 and report.records_out == 1
    assert report.drops == {"prompt does not fit": 2, "empty output": 1}
    assert report.extra["prompt_prefix_tokens"] == len("PREFIX\n\n") and report.extra["context"] == 400


def test_tasks_draw_properties_with_the_seed(prompt):
    records = [{"seed": "s", "concepts": f"c{i}"} for i in range(20)]
    cfg = TasksConfig(prompt=prompt)
    backend = Scripted(lambda p, i: " Write it. \n")
    out, report = stages.tasks(records, backend, cfg, seed=3)
    assert [r["instruction"] for r in out] == ["Write it."] * 20
    assert {r["category"] for r in out} == set(cfg.categories)
    assert {r["difficulty"] for r in out} == set(cfg.difficulties)
    first = backend.calls[0]["prompts"][0]
    r = out[0]
    assert first == (f"PREFIX\n\n### Properties\ncategory: {r['category']}\nlanguage: python\n"
                     f"difficulty: {r['difficulty']}\nconcepts: c0\n\n### Task\n")
    again, _ = stages.tasks(records, Scripted(lambda p, i: "x"), cfg, seed=3)
    assert [(a["category"], a["difficulty"]) for a in again] == [(b["category"], b["difficulty"]) for b in out]
    assert report.records_in == report.records_out == 20


def test_responses_keep_every_raw_sample_and_stop_at_the_next_instruction(prompt):
    backend = Scripted(lambda p, i: f"sample {i}")
    cfg = GenerationStageConfig(prompt=prompt, samples=3)
    out, report = stages.responses([{"instruction": " Add. "}], backend, cfg, seed=0)
    assert [r["response"] for r in out] == ["sample 0", "sample 1", "sample 2"]
    assert backend.calls[0]["prompts"] == ["PREFIX\n\n### Instruction\nAdd.\n\n### Response\n"]
    assert backend.calls[0]["stop"] == ["\n### Instruction"]
    assert report.records_in == report.records_out == 3 and not report.drops


@pytest.mark.parametrize("answer, kept", [("yes", True), ("Yes. yes, no", True), ("no", False),
                                          ("yes no", False), ("not known", False), ("", False)])
def test_the_judge_keeps_a_seed_when_yes_outnumbers_no(prompt, answer, kept):
    backend = Scripted(lambda p, i: answer)
    out, report = stages.judge([{"seed": "def f(x):\n    return x\n"}], backend, SeedsConfig(judge_prompt=prompt))
    assert bool(out) == kept
    assert backend.calls[0]["temperature"] == 0.0 and backend.calls[0]["max_new_tokens"] == 5
    assert report.records_in == 1 and report.drops == ({} if kept else {"judge said no": 1})
