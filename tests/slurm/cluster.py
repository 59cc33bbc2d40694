"""A real single-node Slurm on localhost for tests (../shared/reference/slurm-localhost.md): the
`slurm` fixture starts slurmctld and slurmd once per test module and stops them by PID. It installs
the Debian packages when they are missing and the tests run as root (as in CI); otherwise the
tests that use it skip with the reason. Import it into a test module:
`from tests.slurm.cluster import slurm`."""

import os
import shutil
import subprocess
import time

import pytest

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
