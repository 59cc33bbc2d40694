"""`--executor slurm` of `starcoder curate` and `starcoder selfalign` (datatrove's Slurm executor)
on a real single-node Slurm on localhost (slurmctld + slurmd started once for this module, stopped
by PID): the same output as the local executor. Installs the Debian packages when missing and
running as root; skips otherwise."""

import json
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq

from starcoder.curation.config import load_curate_config
from starcoder.curation.pipeline import curate
from starcoder.curation.stdlib_corpus import build
from starcoder.selfalign.config import load_selfalign_config
from starcoder.selfalign.pipeline import Job, selfalign
from starcoder.selfalign.report import read_jsonl
from tests.slurm.cluster import slurm  # noqa: F401  (the fixture)

PLANTED = Path(__file__).resolve().parents[1] / "selfalign" / "planted.jsonl"


def _rows(out: Path):
    return sorted((r["max_stars_repo_path"], r["max_stars_repo_name"], r["content"])
                  for p in sorted((out / "data").glob("*.parquet")) for r in pq.read_table(p).to_pylist())


def test_curate_on_slurm_equals_local(slurm, tmp_path, monkeypatch):
    build(tmp_path / "in", seed=5, limit=40, duplicates=6, secrets=3, humaneval=2)
    # Jobs inherit the environment (sbatch --export=ALL): this checkout must be importable there.
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    overrides = ["run.tasks=2", "run.workers=2", "near_dedup.num_buckets=5", "near_dedup.hashes_per_bucket=10",
                 "run.slurm_partition=debug", "run.slurm_mem_per_cpu_gb=0.5", "run.slurm_time=00:10:00"]
    cfg = load_curate_config(None, overrides)
    local = curate([str(tmp_path / "in")], str(tmp_path / "local"), cfg)
    assert curate([str(tmp_path / "in")], str(tmp_path / "slurm"), cfg, executor="slurm") is None
    deadline = time.time() + 240
    while not (tmp_path / "slurm" / "report.json").exists():
        assert time.time() < deadline, subprocess.run(["squeue"], capture_output=True, text=True).stdout
        time.sleep(1)
    assert _rows(tmp_path / "slurm") == _rows(tmp_path / "local")
    report = json.loads((tmp_path / "slurm" / "report.json").read_text())
    assert report["stages"] == local["stages"]
    logs = tmp_path / "slurm.work" / "logs"
    assert (logs / "buckets" / "launch_script.slurm").read_text().count("--mem-per-cpu=512M") == 1


def test_selfalign_on_slurm_equals_local(slurm, sandbox, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    cfg = load_selfalign_config(None, ["validate.timeout=1.0", "run.shards=2", "run.tasks=2",
                                       "run.slurm_partition=debug", "run.slurm_mem_per_cpu_gb=0.5",
                                       "run.slurm_time=00:10:00"])

    def job(name):
        return Job(str(tmp_path / name), cfg, ["validate", "select"])

    local = selfalign(job("local"), "local", str(PLANTED))
    assert selfalign(job("slurm"), "slurm", str(PLANTED)) is None
    report = tmp_path / "slurm" / "report.json"
    deadline = time.time() + 240
    while not (report.exists() and "output" in json.loads(report.read_text())):
        assert time.time() < deadline, subprocess.run(["squeue"], capture_output=True, text=True).stdout
        time.sleep(1)
    for stage, shards in (("validate", 2), ("select", 1)):
        for k in range(shards):
            name = f"{stage}/{k:05d}.jsonl"
            assert read_jsonl(tmp_path / "slurm" / name) == read_jsonl(tmp_path / "local" / name), name
    assert json.loads(report.read_text())["stages"][-1] == local["stages"][-1]
    launch = (tmp_path / "slurm" / "logs" / "validate" / "launch_script.slurm").read_text()
    assert "--array=0-1" in launch and "--mem-per-cpu=512M" in launch
