"""Planted responses whose tests are known to pass, fail, time out or not parse: validation
labels each as planted, selection keeps one passing response per instruction that has one."""

from pathlib import Path

import pytest

from starcoder.config import UserError
from starcoder.eval.sandbox import Sandbox

from starcoder.selfalign.parse import parse_response, program
from starcoder.selfalign.report import read_jsonl, run_shard
from starcoder.selfalign.select import select
from starcoder.selfalign.validate import validate

PLANTED = Path(__file__).with_name("planted.jsonl")


@pytest.fixture(scope="module")
def validated(sandbox):
    records = read_jsonl(PLANTED)
    return records, *validate(records, sandbox, timeout=1.0, workers=4)


def test_validation_classifies_every_planted_response(validated):
    planted, out, report = validated
    assert [r["status"] for r in out] == [r["expected"] for r in planted]
    expected = {s: sum(r["expected"] == s for r in planted) for s in ("pass", "fail", "timeout", "unparsable")}
    assert report.extra["statuses"] == {s: n for s, n in expected.items() if n}
    assert report.records_in == report.records_out == len(planted)
    rates = {r["instruction"][:12]: (r["samples"], r["passed"]) for r in report.extra["per_instruction"]}
    assert rates["Write a Pyth"] == (5, 2) and rates["Implement `r"] == (4, 0)


def test_both_sandbox_modes_label_every_planted_response_the_same(validated, sandbox):
    planted, out, _ = validated  # in the session sandbox's mode
    with Sandbox(persistent=not sandbox.persistent) as other:
        again, _ = validate(planted, other, timeout=1.0, workers=4)
    assert [(r["status"], r["reason"]) for r in again] == [(r["status"], r["reason"]) for r in out]


def test_selection_keeps_one_passing_response_per_instruction(validated):
    planted, out, _ = validated
    with_a_pass = {r["instruction"] for r in planted if r["expected"] == "pass"}
    passing = {(r["instruction"], r["response"]) for r in out if r["status"] == "pass"}
    chosen = {}
    for seed in range(8):
        kept, report = select(out, seed=seed)
        assert sorted(r["instruction"] for r in kept) == sorted(with_a_pass)
        assert all(set(r) == {"instruction", "response"} for r in kept)
        assert {(r["instruction"], r["response"]) for r in kept} <= passing
        for r in kept:
            chosen.setdefault(r["instruction"], set()).add(r["response"])
        assert report.drops["fail"] == sum(r["expected"] == "fail" for r in planted)
        assert report.drops["timeout"] == sum(r["expected"] == "timeout" for r in planted)
        assert report.drops["unparsable"] == sum(r["expected"] == "unparsable" for r in planted)
        assert report.drops["duplicate instruction"] == 1
        assert select(out, seed=seed)[0] == kept  # seeded
    # The instruction with two passing responses gets either one, by the seed.
    assert max(len(v) for v in chosen.values()) == 2


def test_a_finished_shard_is_not_redone(validated, tmp_path):
    _, out, _ = validated
    reads = []
    args = (tmp_path / "select.jsonl", tmp_path / "select.report.json")
    first = run_shard(select, lambda: reads.append(1) or out, *args)
    again = run_shard(select, lambda: reads.append(1) or [], *args)
    assert reads == [1]  # a finished shard's records are not read again
    assert again.to_dict() == first.to_dict() and first.records_out == 3
    assert len(read_jsonl(tmp_path / "select.jsonl")) == 3


def test_unparsable_outputs_have_reasons_and_never_raise():
    assert parse_response("").error == "no tests section"
    assert parse_response("### Response\n\n### Tests\n```python\nassert 1\n```").error == "empty response"
    assert parse_response("### Response\ntext\n### Tests\n```python\nx\n```").error == "no code block in response"
    assert parse_response("### Response\n```python\nx = 1\n```\n### Tests\nnone").error == "no code block in tests"
    # An unterminated fence is no block; a block in another language is not Python.
    assert parse_response("### Response\n```python\nx = 1\n### Tests\n```python\nassert x\n```").error
    assert parse_response("### Response\n```rust\nfn main(){}\n```\n### Tests\n```python\nx\n```").error


def test_a_record_without_its_fields_is_one_line_naming_it(sandbox):
    with pytest.raises(UserError, match="record 2: needs the text fields `instruction` and `response`"):
        validate([{"instruction": "x", "response": "y"}, {"instruction": "x"}], sandbox)


def test_program_is_code_then_tests_and_stops_at_the_next_section():
    p = parse_response("### Response\n```python\ndef f():\n    return 1\n```\nExplained.\n\n"
                       "### Tests\n```python\nassert f() == 1\n```\n\n### Instruction\n```python\nboom\n```")
    assert p.error is None and p.response.endswith("Explained.")
    assert program(p) == "def f():\n    return 1\n\n\nassert f() == 1\n"


def test_near_duplicate_instructions_keep_one():
    base = ("Write a function that takes a list of integers and returns a new list holding only the "
            "even numbers, in their original order, without modifying the input list in any way, "
            "and document the behaviour for an empty input list")
    rows = [{"instruction": base + tail, "response": f"Answer {i}: " + resp, "code": code, "status": "pass"}
            for i, (tail, resp, code) in enumerate([
                ("", "use a comprehension", "def evens(xs):\n    return [x for x in xs if x % 2 == 0]"),
                (" please", "filter it", "def evens(v):\n    return list(filter(lambda n: n % 2 == 0, v))"),
            ])]
    rows.append({"instruction": "Sort a list of strings by length, then alphabetically.",
                 "response": "Use sorted with a key.", "code": "def by_len(xs):\n    return sorted(xs, key=lambda s: (len(s), s))",
                 "status": "pass"})
    kept, report = select(rows, seed=0)
    assert len(kept) == 2 and report.drops["near-duplicate instruction"] == 1
    assert report.drops["near-duplicate response"] == report.drops["near-duplicate code"] == 0


HOSTILE = {  # the eval sandbox's hostile programs (tests/eval/test_sandbox.py), as responses
    "write outside": "open({probe!r}, 'w').write('pwned')",
    "network": "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=2)",
    "remount": "import subprocess\nsubprocess.run(['mount', '-o', 'remount,rw,bind', '/'], check=True)",
    "fork bomb": "import os\nfor _ in range(300):\n    if os.fork() == 0:\n        import time; time.sleep(5); os._exit(0)",
    "memory": "x = bytearray(100 * 10**9)",
    "loop": "import os\nfor _ in range(3):\n    if os.fork() == 0:\n        break\nwhile True:\n    pass",
    "output": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
    "parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(-1, signal.SIGKILL)",
}


def test_hostile_responses_fail_inside_the_sandbox_and_harm_nothing(sandbox, tmp_path):
    probe = tmp_path / "pwned"
    fence = "`" * 3
    records = [{"instruction": name, "response": f"### Response\n{fence}python\n{code.format(probe=str(probe))}\n"
                f"{fence}\n\n### Tests\n{fence}python\nassert True\n{fence}\n"} for name, code in HOSTILE.items()]
    records.append({"instruction": "benign", "response": records[0]["response"].replace(
        f"open({str(probe)!r}, 'w').write('pwned')", "x = 1")})
    out, report = validate(records, sandbox, timeout=2.0, workers=2)
    status = {r["instruction"]: r["status"] for r in out}
    assert status.pop("benign") == "pass"  # the sandbox still runs programs after all of them
    assert status == {**{name: "fail" for name in HOSTILE}, "loop": "timeout"}
    assert not probe.exists()
