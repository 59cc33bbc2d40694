"""The sbatch script of a launch, from one template: `starcoder launch` writes it into the run
folder, and tools/gen_slurm_templates.py writes tools/train.sbatch and tools/slurm/<preset>.sbatch
from the same function, so the hand-editable templates cannot drift from what the launcher runs.

Ranks are started by `srun`, one task per GPU, not by one `torchrun` per node: SLURM then signals
every rank itself (USR1 before the time limit, SIGTERM on scancel or preemption) with no agent in
between whose own signal handling and shutdown timeout must be tuned, `--kill-on-bad-exit` sees
each rank, and the mapping of SLURM_PROCID to RANK is in starcoder/training/distributed.py. The
torchrun alternative is in docs/slurm.md.

The script decides what to do after the step from the trainer's stop marker (`RUN/stop.json`,
written by starcoder/training/trainer.py), not from the exit code alone, and logs every requeue in
`RUN/restarts.jsonl`: failures are counted there (SLURM_RESTART_COUNT also counts planned
time-limit requeues and is unset on the first run).
"""

from __future__ import annotations

import shlex
import textwrap
from dataclasses import dataclass, field


@dataclass
class SlurmJob:
    run_dir: str  # train.output_dir: logs, stop marker, restart log and checkpoints
    config: str | None  # --config FILE|PRESET; None: every train argument comes from "$@"
    overrides: list[str] = field(default_factory=list)  # --set items
    nodes: int = 1
    gpus_per_node: int | None = 8  # None: CPU nodes
    cpu_tasks_per_node: int | None = None  # CPU nodes (gloo)
    cpus_per_task: int | None = None
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    signal_lead: int = 600  # seconds before the time limit at which USR1 arrives
    max_restarts: int = 3  # requeues after failures (dead rank, hung collective, crash)
    job_name: str = "starcoder"
    python: str = "python"
    workdir: str | None = None  # --chdir; relative paths in the config resolve from here
    title: str = "written by `starcoder launch`"

    @property
    def tasks_per_node(self) -> int:
        return self.cpu_tasks_per_node if self.cpu_tasks_per_node else self.gpus_per_node


def render(job: SlurmJob) -> str:
    directives = [f"--job-name={job.job_name}", f"--nodes={job.nodes}",
                  f"--ntasks-per-node={job.tasks_per_node}"]
    if not job.cpu_tasks_per_node:
        directives.append(f"--gpus-per-node={job.gpus_per_node}")
    if job.cpus_per_task:
        directives.append(f"--cpus-per-task={job.cpus_per_task}")
    directives.append(f"--time={job.time}")
    if job.partition:
        directives.append(f"--partition={job.partition}")
    if job.account:
        directives.append(f"--account={job.account}")
    directives += [f"--signal=B:USR1@{job.signal_lead}", "--requeue", "--open-mode=append",
                   f"--output={job.run_dir}/slurm-%j.out"]
    if job.workdir:
        directives.append(f"--chdir={job.workdir}")
    train_args = []
    if job.config is not None:
        train_args += ["--config", job.config]
    for item in job.overrides:
        train_args += ["--set", item]
    train_lines = "".join(f"    {shlex.quote(a)}\n" for a in train_args)
    gpu_env = "" if job.cpu_tasks_per_node else GPU_ENV
    title = textwrap.fill(f"starcoder training on SLURM, {job.title}. Edit freely; docs/slurm.md "
                          "explains every part.", 96, initial_indent="# ", subsequent_indent="# ")
    return "#!/bin/bash\n" + title + "\n" + HEADER + "".join(f"#SBATCH {d}\n" for d in directives) + BODY.format(
        run=shlex.quote(job.run_dir), max_restarts=job.max_restarts, python=shlex.quote(job.python),
        train_lines=train_lines, gpu_env=gpu_env)


HEADER = """\
#
# Submit with `sbatch THIS_FILE [--set section.key=value ...]` (extra arguments go to
# `starcoder train`). The run folder RUN holds the SLURM log (slurm-JOBID.out), the checkpoints
# (training resumes from RUN/checkpoints/latest by itself), the trainer's stop marker
# RUN/stop.json and the restart log RUN/restarts.jsonl; `starcoder status RUN` summarises them.
#
# One task per GPU, started by srun (no torchrun), so SLURM signals every rank itself.
# How a job ends, decided below from RUN/stop.json after the step:
#   finished        max_steps reached                       -> exit 0, no requeue
#   signal SIGUSR1  the time limit is near (--signal below)  -> checkpoint saved, requeue
#   signal SIGTERM  scancel, preemption or the time limit    -> checkpoint saved, no requeue here
#                   (SLURM requeues a preempted job itself where the cluster sets
#                   PreemptMode=REQUEUE; the save must finish within its GraceTime)
#   exit status 2   a user mistake (bad config, missing file) -> never requeue
#   anything else   a rank died, a node was lost, a collective hung past
#                   parallel.collective_timeout_s, a crash    -> requeue, at most MAX_RESTARTS times
# Choose the USR1 lead time above one training step + one checkpoint save + a minute: SLURM
# checks it about once a minute.
#
"""

BODY = """
set -uo pipefail
RUN=${{RUN:-{run}}}
MAX_RESTARTS=${{MAX_RESTARTS:-{max_restarts}}}
PYTHON=${{PYTHON:-{python}}}
TRAIN_ARGS=(
{train_lines})

# Rank 0 on the first node listens for the others; a port per job, so a requeued job does not
# meet its predecessor's socket.
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${{MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}}
export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-${{SLURM_CPUS_PER_TASK:-1}}}}
export PYTHONUNBUFFERED=1
{gpu_env}
log() {{ echo "$(date -Is) [launch] $*"; }}
restart_log() {{  # cause, requeued (true|false): one line of RUN/restarts.jsonl
    printf '{{"time": "%s", "job": "%s", "slurm_restart_count": %s, "cause": "%s", "exit_status": %s, "step": %s, "checkpoint": "%s", "requeued": %s}}\\n' \\
        "$(date -Is)" "$SLURM_JOB_ID" "${{SLURM_RESTART_COUNT:-0}}" "$1" "$status" "$step" \\
        "$(cat "$RUN/checkpoints/latest" 2>/dev/null)" "$2" >> "$RUN/restarts.jsonl"
}}

# USR1 reaches this shell only (B: above); pass it on to every rank. SIGTERM (scancel,
# preemption) reaches the ranks directly: this shell only waits for their checkpoint.
on_usr1() {{ log "time limit near: every rank checkpoints at the next step and stops"; scancel --signal=USR1 "$SLURM_JOB_ID"; }}
on_term() {{ log "SIGTERM: the ranks checkpoint and stop"; }}
trap on_usr1 USR1
trap on_term TERM

mkdir -p "$RUN"
rm -f "$RUN/stop.json"  # the trainer writes a fresh one when it stops
log "job $SLURM_JOB_ID (SLURM restart ${{SLURM_RESTART_COUNT:-0}}): $SLURM_NTASKS ranks, master $MASTER_ADDR:$MASTER_PORT"
# --kill-on-bad-exit: one dead rank ends the step, instead of the others waiting in a collective.
srun --kill-on-bad-exit=1 "$PYTHON" -m starcoder train "${{TRAIN_ARGS[@]}}" "$@" --set train.output_dir="$RUN" &
srun_pid=$!
while true; do
    wait "$srun_pid"; status=$?
    kill -0 "$srun_pid" 2>/dev/null || break  # still running: a trap interrupted `wait`
done

# The stop marker: reason (finished | signal | failed, or none when the ranks were killed),
# the signal, the step, and the error's type.
read -r reason signal step error < <("$PYTHON" -c '
import json, sys
try:
    m = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    m = {{}}
print(m.get("reason", "none"), m.get("signal") or "-", m.get("step", "null"),
      (m.get("error") or "-").split(":")[0])' "$RUN/stop.json")

if [ "$reason" = finished ]; then
    log "finished at step $step"; exit 0
elif [ "$status" = 2 ] || [ "$error" = ConfigError ] || [ "$error" = UserError ]; then
    log "a user mistake (see the error above): not requeueing; fix it and submit again"; exit 2
elif [ "$reason" = signal ] && [ "$signal" = SIGUSR1 ]; then
    restart_log time_limit true
    log "checkpoint saved at step $step; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"; exit 0  # the requeue ends this script at once
elif [ "$reason" = signal ]; then
    log "stopped by $signal at step $step with a checkpoint; not requeueing"; exit 0
fi
failures=$(grep -c '"cause": "failure"' "$RUN/restarts.jsonl" 2>/dev/null)
if [ "${{failures:-0}}" -ge "$MAX_RESTARTS" ]; then
    restart_log failure false
    log "the step failed (status $status, stop marker: $reason); $MAX_RESTARTS restarts used, giving up"
    exit "$status"
fi
restart_log failure true
log "the step failed (status $status, stop marker: $reason): requeue $((failures + 1)) of $MAX_RESTARTS, resuming from the last checkpoint"
scontrol requeue "$SLURM_JOB_ID"
exit "$status"
"""

GPU_ENV = """\
# NCCL: a failed or timed-out collective aborts the process (every rank exits non-zero, the job
# requeues) instead of hanging; warnings only; one CUDA work queue, as Megatron's sequence
# parallel overlap needs.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
"""
