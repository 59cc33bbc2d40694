"""`starcoder preprocess --format instruct | commit | chat | preference`: the tokens, the loss mask
beside them (prompt 0, response and closing EOS 1), the preference pairing, the commit markers and
malformed records; megatron-core reads both datasets."""

from __future__ import annotations

import json

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from starcoder.config import UserError
from starcoder.data import preprocess_corpus
from starcoder.data.examples import INSTRUCT_TEMPLATE, SYSTEM
from starcoder.data.indexed import IndexedMask, IndexedTokens
from tests.data.conftest import real_tokenizer_path, write_jsonl

PAIRS = [("Write a function that adds two numbers.", "def add(a, b):\n    return a + b\n"),
         ("Reverse a string s.", "s[::-1]"),
         ("Explain <|endoftext|> briefly.", "It ends a document.")]


def _read(prefix: str):
    tokens, mask = IndexedTokens(prefix), IndexedMask(f"{prefix}_loss_mask")
    return [(np.asarray(tokens[i]).tolist(), np.asarray(mask[i]).tolist()) for i in range(len(tokens))]


def _expected(tok, prompt: str, response: str) -> tuple[list[int], list[int]]:
    ids = tok.encode(prompt), tok.encode(response) + [tok.eod_id]
    return ids[0] + ids[1], [0] * len(ids[0]) + [1] * len(ids[1])


def test_instruct_mask_covers_the_response_and_eos_only(tmp_path, tiny):
    rows = [{"instruction": i, "response": r} for i, r in PAIRS]
    report = preprocess_corpus([write_jsonl(tmp_path / "a.jsonl", rows)], "builtin:tiny",
                               str(tmp_path / "sft"), fmt="instruct", progress=False)
    got = _read(str(tmp_path / "sft"))
    before, after = INSTRUCT_TEMPLATE.split("{instruction}")
    assert before == SYSTEM + "\n\n### Instruction\n" and after == "\n\n### Response\n{response}"
    for (ids, mask), (instruction, response) in zip(got, PAIRS):
        assert (ids, mask) == _expected(tiny, before + instruction + "\n\n### Response\n", response)
        assert tiny.decode([t for t, m in zip(ids, mask) if m]) == response + "<|endoftext|>"
    assert report.target_tokens == sum(sum(m) for _, m in got)
    assert json.loads((tmp_path / "sft.json").read_text())["loss_mask"] == "sft_loss_mask"
    # megatron-core reads both datasets, sequence by sequence
    meg_tokens, meg_mask = IndexedDataset(str(tmp_path / "sft")), IndexedDataset(str(tmp_path / "sft_loss_mask"))
    assert [meg_tokens[i].tolist() for i in range(3)] == [ids for ids, _ in got]
    assert [meg_mask[i].tolist() for i in range(3)] == [m for _, m in got]
    # a configurable template
    preprocess_corpus([tmp_path / "a.jsonl"], "builtin:tiny", str(tmp_path / "oct"), fmt="instruct",
                      template="Question: {instruction}\n\nAnswer: {response}", progress=False)
    assert _read(str(tmp_path / "oct"))[1] == _expected(tiny, "Question: Reverse a string s.\n\nAnswer: ",
                                                      "s[::-1]")
    with pytest.raises(UserError, match="must end with"):
        preprocess_corpus([tmp_path / "a.jsonl"], "builtin:tiny", str(tmp_path / "x"), fmt="instruct",
                          template="{response} after {instruction}", progress=False)


def test_malformed_records_are_counted_never_fatal(tmp_path):
    rows = [{"instruction": "ok", "response": "fine"}, {"instruction": "no response"},
            {"instruction": "empty", "response": ""}, {"instruction": 3, "response": "x"}]
    path = write_jsonl(tmp_path / "a.jsonl", rows, raw_lines=[b"{broken", b"[1, 2]"])
    report = preprocess_corpus([path], "builtin:tiny", str(tmp_path / "p"), fmt="instruct", progress=False)
    assert report.documents == 1 and report.records == 6
    assert report.bad_records == {"missing key": 2, "empty field": 1, "invalid JSON": 1,
                                  "not a JSON object": 1}
    assert "a.jsonl:2: missing key (response)" in report.summary()
    chats = [{"messages": [{"role": "user", "content": "hi"}]},  # nothing to learn
             {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"},
                           {"role": "assistant", "content": "y"}]},  # the default template refuses
             {"messages": "hi"}, {"messages": [{"content": "no role"}]},
             {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    report = preprocess_corpus([write_jsonl(tmp_path / "c.jsonl", chats)], "builtin:tiny",
                               str(tmp_path / "c"), fmt="chat", progress=False)
    assert report.documents == 1
    assert report.bad_records == {"no assistant message": 1, "chat template error": 1,
                                  "missing key": 1, "bad message": 1}
    with pytest.raises(UserError, match="0 documents"):  # nothing usable: nothing written
        preprocess_corpus([write_jsonl(tmp_path / "d.jsonl", chats[:2])], "builtin:tiny",
                          str(tmp_path / "d"), fmt="chat", progress=False)
    assert not (tmp_path / "d.idx").exists()


def test_chat_masks_every_assistant_turn(tmp_path, tiny):
    one = [{"role": "user", "content": PAIRS[0][0]}, {"role": "assistant", "content": PAIRS[0][1]}]
    many = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": "left out"}]
    write_jsonl(tmp_path / "c.jsonl", [{"messages": one}, {"messages": many}])
    report = preprocess_corpus([tmp_path / "c.jsonl"], "builtin:tiny", str(tmp_path / "chat"),
                               fmt="chat", progress=False)
    assert report.chat_template == "default"
    (ids1, mask1), (ids2, mask2) = _read(str(tmp_path / "chat"))
    # one turn through the default chat template is exactly the instruct example
    preprocess_corpus([write_jsonl(tmp_path / "i.jsonl", [{"instruction": PAIRS[0][0], "response": PAIRS[0][1]}])],
                      "builtin:tiny", str(tmp_path / "ins"), fmt="instruct", progress=False)
    assert _read(str(tmp_path / "ins")) == [(ids1, mask1)]
    # two assistant turns: two target runs, each response closed by EOS; the last user turn dropped
    runs = np.flatnonzero(np.diff([0, *mask2, 0]))
    spans = [tiny.decode(ids2[a:b]) for a, b in zip(runs[::2], runs[1::2])]
    assert spans == ["hello<|endoftext|>", "ok<|endoftext|>"]
    assert tiny.decode(ids2) == ("Be brief.\n\n### Instruction\nhi\n\n### Response\nhello<|endoftext|>"
                                 "\n\n### Instruction\nmore\n\n### Response\nok<|endoftext|>")


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("where", ["chat_template.jinja", "tokenizer_config.json"])
def test_chat_template_from_the_tokenizer_folder_renders_as_transformers(tmp_path, tiny, where):
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "tok"
    tiny.save(folder)
    if where == "chat_template.jinja":
        (folder / where).write_text(CHATML)
    else:
        (folder / where).write_text(json.dumps({"chat_template": CHATML}))
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
                {"role": "assistant", "content": "6"}]
    report = preprocess_corpus([write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}])], str(folder),
                               str(tmp_path / "chat"), fmt="chat", progress=False)
    assert report.chat_template == str(folder / where)
    ((ids, mask),) = _read(str(tmp_path / "chat"))
    oracle = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    text = oracle.apply_chat_template(messages, tokenize=False, chat_template=CHATML)
    assert tiny.decode(ids) == text + "<|endoftext|>"  # the template has no EOS: one is added
    runs = np.flatnonzero(np.diff([0, *mask, 0]))
    assert [tiny.decode(ids[a:b]) for a, b in zip(runs[::2], runs[1::2])] == \
        ["4<|im_end|>\n", "6<|im_end|>\n<|endoftext|>"]


def test_commit_layout_with_the_starcoder_tokens(tmp_path):
    from starcoder.data import load_tokenizer

    path = real_tokenizer_path("starcoder")
    sc1 = load_tokenizer(path)
    rows = [{"old_file": f"src/pkg/mod{i}.py", "old_contents": f"x = {i}\n", "subject": f"Set x to {i + 1}",
             "message": "ignored when subject is there", "new_contents": f"x = {i + 1}\n"} for i in range(40)]
    rows.append({"old_file": "a.py", "old_contents": "", "message": "Create a", "new_contents": "pass\n"})
    write_jsonl(tmp_path / "c.jsonl", rows)
    preprocess_corpus([tmp_path / "c.jsonl"], str(path), str(tmp_path / "commit"), fmt="commit",
                      seed=7, progress=False)
    got = _read(str(tmp_path / "commit"))
    with_name = 0
    for (ids, mask), row in zip(got, rows):
        name = f"<filename>{row['old_file'].split('/')[-1]}"
        prompt = f"<commit_before>{row['old_contents']}<commit_msg>"
        subject = row.get("subject", row["message"])
        target = f"{subject}<commit_after>{row['new_contents']}<|endoftext|>"
        text = sc1.decode([t for t, m in zip(ids, mask) if not m])
        assert text in (prompt, name + prompt)
        with_name += text.startswith("<filename>")
        assert sc1.decode([t for t, m in zip(ids, mask) if m]) == target
        assert sc1.token_to_id("<commit_after>") in ids and sc1.token_to_id("<commit_before>") in ids
    assert 10 <= with_name <= 31  # probability 0.5 over 41 records
    # the draws are seeded: the same files again; another seed draws differently
    preprocess_corpus([tmp_path / "c.jsonl"], str(path), str(tmp_path / "again"), fmt="commit", seed=7,
                      progress=False)
    assert _read(str(tmp_path / "again")) == got
    preprocess_corpus([tmp_path / "c.jsonl"], str(path), str(tmp_path / "other"), fmt="commit", seed=8,
                      progress=False)
    assert _read(str(tmp_path / "other")) != got


def test_commit_markers_missing_from_the_tokenizer(tmp_path, tiny, capsys):
    from starcoder.cli import main

    row = {"old_file": "a/b.py", "old_contents": "x = 1\n", "subject": "Bump", "new_contents": "x = 2\n"}
    write_jsonl(tmp_path / "c.jsonl", [row])
    args = ["preprocess", "--input", str(tmp_path / "c.jsonl"), "--tokenizer", "builtin:tiny",
            "--output-prefix", str(tmp_path / "commit"), "--format", "commit", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --format commit: tokenizer builtin:tiny has no <filename>, "
                   "<commit_before>, <commit_msg>, <commit_after> token(s); pass --commit-markers "
                   "text to spell them as plain text")
    assert main(args + ["--commit-markers", "text", "--meta-prob", "1"]) == 0
    ((ids, mask),) = _read(str(tmp_path / "commit"))
    assert (ids, mask) == _expected(tiny, "<filename>b.py<commit_before>x = 1\n<commit_msg>",
                                    "Bump<commit_after>x = 2\n")


def test_preference_pairs_are_documents_of_two_sequences(tmp_path, tiny):
    rows = [{"prompt": f"Task {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(3)]
    rows.insert(1, {"prompt": "Task x", "chosen": "only chosen"})
    report = preprocess_corpus([write_jsonl(tmp_path / "p.jsonl", rows)], "builtin:tiny",
                               str(tmp_path / "pref"), fmt="preference", progress=False)
    assert report.pairs == 3 and report.documents == 6 and report.bad_records == {"missing key": 1}
    got = _read(str(tmp_path / "pref"))
    before = INSTRUCT_TEMPLATE.split("{instruction}")[0]
    kept = [r for r in rows if "rejected" in r]
    for i, row in enumerate(kept):
        prompt = before + row["prompt"] + "\n\n### Response\n"
        assert got[2 * i] == _expected(tiny, prompt, row["chosen"])
        assert got[2 * i + 1] == _expected(tiny, prompt, row["rejected"])
    meg = IndexedDataset(str(tmp_path / "pref"))
    assert meg.document_indices.tolist() == [0, 2, 4, 6]
    assert IndexedDataset(str(tmp_path / "pref_loss_mask")).document_indices.tolist() == [0, 2, 4, 6]



def test_workers_give_byte_identical_files(tmp_path):
    rows = [{"old_file": f"p/m{i}.py", "old_contents": f"v = {i}\n" * (i % 5), "subject": f"Edit {i}",
             "new_contents": f"v = {i + 1}\n"} for i in range(60)]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    for workers in (1, 2):
        preprocess_corpus([path], "builtin:tiny", str(tmp_path / f"w{workers}"), fmt="commit",
                          commit_markers="text", workers=workers, chunk_bytes=200, progress=False)
    for suffix in (".bin", ".idx", "_loss_mask.bin", "_loss_mask.idx"):
        assert (tmp_path / f"w1{suffix}").read_bytes() == (tmp_path / f"w2{suffix}").read_bytes()


@pytest.mark.parametrize("fmt, option, value", [("instruct", "meta_prob", 0.3), ("chat", "meta_prob", 0.3),
                                                ("plain", "template", "{instruction}{response}"),
                                                ("instruct", "chat_template", "{{ messages }}")])
def test_an_option_the_format_does_not_use_is_refused(tmp_path, fmt, option, value):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"instruction": "a", "response": "b", "content": "c"}) + "\n")
    flag = "--" + option.replace("_", "-")
    with pytest.raises(UserError, match=f"^{flag}: not used by --format {fmt} "):
        preprocess_corpus([path], "builtin:tiny", str(tmp_path / "out"), fmt=fmt, progress=False,
                          **{option: value})
    assert not list(tmp_path.glob("out*"))  # nothing written
