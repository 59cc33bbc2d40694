"""`--executor slurm` on a real single-node Slurm on localhost (slurmctld + slurmd started once for
this module, stopped by PID): same output as the local executor. Installs the Debian packages when
missing and running as root; skips otherwise."""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from starcoder.curation.config import load_curate_config
from starcoder.curation.pipeline import curate
from starcoder.curation.stdlib_corpus import build

SLURM_CONF = """\
ClusterName=test
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=5
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation={s}/state/ctld
SlurmdSpoolDir={s}/state/d
SlurmctldPidFile={s}/state/slurmctld.pid
SlurmdPidFile={s}/state/slurmd.pid
SlurmctldLogFile={s}/log/slurmctld.log
SlurmdLogFile={s}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
MailProg=/bin/true
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _ensure_packages():
    if shutil.which("slurmctld") and shutil.which("slurmd") and shutil.which("sbatch"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and installing it needs root with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    ok = subprocess.run("apt-get update -qq && apt-get install -y -qq --no-install-recommends "
                        "slurmctld slurmd slurm-client", shell=True, env=env,
                        capture_output=True).returncode == 0
    if not ok:
        pytest.skip("could not apt-get install slurmctld slurmd slurm-client")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    _ensure_packages()
    s = tmp_path_factory.mktemp("slurm")
    for sub in ("state/ctld", "state/d", "log"):
        (s / sub).mkdir(parents=True)
    conf = s / "slurm.conf"
    conf.write_text(SLURM_CONF.format(s=s))
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    daemons = [subprocess.Popen(["/usr/sbin/slurmctld", "-D", "-f", str(conf)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL),
               subprocess.Popen(["/usr/sbin/slurmd", "-D", "-N", "localhost", "-f", str(conf)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout
            if "idle" in out:
                break
            time.sleep(0.5)
        else:
            pytest.skip(f"the local Slurm did not come up (sinfo: {out!r})")
        yield s
    finally:
        for p in daemons:  # by the PIDs started here
            p.terminate()
            p.wait(timeout=30)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


def _rows(out: Path):
    return sorted((r["max_stars_repo_path"], r["max_stars_repo_name"], r["content"])
                  for p in sorted((out / "data").glob("*.parquet")) for r in pq.read_table(p).to_pylist())


def test_slurm_executor_output_equals_local(slurm, tmp_path, monkeypatch):
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
