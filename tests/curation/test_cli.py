"""`starcoder curate` end to end on a small stdlib corpus (two worker processes, datatrove's
forkserver path), its output read by `starcoder preprocess`, and its user errors."""

import json

import pyarrow.parquet as pq
import pytest

from starcoder.cli import main
from starcoder.curation.config import load_curate_config
from starcoder.config import ConfigError
from starcoder.curation.stdlib_corpus import build


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    truth = build(tmp / "in", seed=3, limit=150, duplicates=12, secrets=6, humaneval=4)
    rc = main(["curate", "--input", str(tmp / "in"), "--output", str(tmp / "out"),
               "--workers", "2", "--tasks", "2"])
    rows = [r for p in sorted((tmp / "out" / "data").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    return tmp, truth, rc, rows


def test_curate_removes_and_redacts_what_was_planted(run):
    tmp, truth, rc, rows = run
    assert rc == 0
    report = json.loads((tmp / "out" / "report.json").read_text())
    stages = report["stages"]
    assert stages["decontamination"]["docs_in"] - stages["decontamination"]["docs_out"] == 4
    assert not any(r["max_stars_repo_path"].startswith("solutions/") for r in rows)
    # planted copies, plus any identical files the stdlib itself holds
    assert stages["exact_dedup"]["reasons"]["duplicate"] >= len(truth["exact"])
    for path in truth["exact"] + truth["near"]:  # the starred original survives, not the fork
        survivors = [r for r in rows if r["max_stars_repo_path"] == path]
        assert [r["max_stars_repo_name"] for r in survivors] == ["python/cpython"]
    text = "\n".join(r["content"] for r in rows)
    for values in truth["secrets"]:
        for kind, value in values.items():
            assert value not in text, kind
    assert "<KEY>" in text and "<PASSWORD>" in text and "<EMAIL>" in text
    assert (tmp / "out" / "distributions.png").stat().st_size > 1000
    assert {"max_stars_count", "max_stars_repo_licenses", "lang"} <= set(rows[0])


def test_preprocess_reads_the_output(run, tmp_path):
    tmp, _, _, rows = run
    from starcoder.data.preprocess import preprocess_corpus
    report = preprocess_corpus(str(tmp / "out" / "data"), "builtin:tiny", str(tmp_path / "py"),
                               progress=False)
    assert report.documents == len(rows) and report.bad == 0


def test_user_errors_exit_2_naming_the_file_or_key(run, tmp_path, capsys):
    tmp, _, _, _ = run
    assert main(["curate", "--input", str(tmp / "in"), "--output", str(tmp / "out")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["curate", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["curate", "--input", str(tmp / "in"), "--output", str(tmp_path / "o"),
                 "--set", "near_dedup.treshold=0.8"]) == 2
    assert "near_dedup.treshold: unknown key (did you mean threshold?)" in capsys.readouterr().err
    # A completed work folder is not silently reused (datatrove would skip every task).
    (tmp_path / "o2.work" / "logs").mkdir(parents=True)
    assert main(["curate", "--input", str(tmp / "in"), "--output", str(tmp_path / "o2")]) == 2
    assert "--resume" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="run.tasks"):
        load_curate_config(None, ["run.tasks=0"])
    with pytest.raises(ConfigError, match="pii.replacement"):
        load_curate_config({"pii": {"replacement": "stars"}})
