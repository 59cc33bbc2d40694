"""`starcoder status RUN_DIR`: what a run folder says about its run, from its files only: steps
done (metrics.jsonl), the last checkpoint (checkpoints/latest), how the last run stopped
(stop.json), every requeue and its cause (restarts.jsonl, written by the sbatch script) and the
last lines of the newest SLURM log."""

from __future__ import annotations

import json
from pathlib import Path

from starcoder.config import UserError
from starcoder.convert.checkpoints import latest_checkpoint

CAUSES = {"time_limit": "time limit near (USR1): checkpoint saved",
          "failure": "the step failed (a rank died, a hung collective or a crash)"}


def _records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a kill: the others still tell the story
    return rows


def summarize(run_dir: str | Path, log_lines: int = 10) -> str:
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"{run}: no such run folder")
    steps = [r["step"] for r in _records(run / "metrics.jsonl") if "step" in r]
    checkpoint = latest_checkpoint(run)
    lines = [f"run {run}",
             f"steps done: {max(steps) if steps else 0}",
             f"last checkpoint: {checkpoint.name if checkpoint else 'none'}"]
    marker = _records(run / "stop.json")
    if marker:
        m = marker[0]
        how = {"finished": "finished", "signal": f"stopped by {m.get('signal')} with a checkpoint",
               "failed": f"failed ({m.get('error')})"}.get(m.get("reason"), m.get("reason"))
        lines.append(f"last stop: {how} at step {m.get('step')}")
    else:
        lines.append("last stop: no stop marker (running, or killed before it could write one)")
    restarts = _records(run / "restarts.jsonl")
    failures = sum(r.get("cause") == "failure" for r in restarts)
    lines.append(f"restarts: {sum(bool(r.get('requeued')) for r in restarts)} "
                 f"({failures} after failures)")
    for r in restarts:
        action = "requeued" if r.get("requeued") else "not requeued (restarts used up)"
        lines.append(f"  {r.get('time')} job {r.get('job')}: {CAUSES.get(r.get('cause'), r.get('cause'))}, "
                     f"exit status {r.get('exit_status')}, last checkpoint {r.get('checkpoint') or 'none'}; "
                     f"{action}")
    logs = sorted(run.glob("slurm-*.out"), key=lambda p: p.stat().st_mtime)
    if logs:
        tail = logs[-1].read_text(errors="replace").splitlines()[-log_lines:]
        lines.append(f"last lines of {logs[-1].name}:")
        lines += [f"  {line}" for line in tail]
    return "\n".join(lines)
