"""SLURM launches: the sbatch script (`script`), the checks of a dry run (`checks`) and the
summary of a run folder (`status`). The CLI commands are `starcoder launch` and `starcoder status`."""

from starcoder.launch.checks import Layout, check_launch
from starcoder.launch.script import SlurmJob, render
from starcoder.launch.status import summarize

__all__ = ["Layout", "SlurmJob", "check_launch", "render", "summarize"]
