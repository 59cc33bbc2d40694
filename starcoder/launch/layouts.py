"""The layout each preset's SLURM template uses (tools/slurm/<preset>.sbatch): nodes x GPUs and the
parallel settings, from the papers and model cards where they say (starcoder-spec.md), otherwise
the smallest H100 layout we would pick that divides the preset's global batch."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PaperLayout:
    nodes: int
    gpus_per_node: int
    overrides: list[str] = field(default_factory=list)  # on top of the preset
    source: str = ""


PAPER_LAYOUTS = {
    "starcoder-15b": PaperLayout(64, 8, ["parallel.pipeline_parallel=4"],
                                 "paper: 512 A100, TP 4 x PP 4 with sequence parallel, DP 32, micro-batch 1, "
                                 "global batch 512"),
    "starcoderbase-7b": PaperLayout(64, 8, [], "our choice: TP 2 (preset), DP 256"),
    "starcoderbase-3b": PaperLayout(32, 8, [], "our choice: DP 256"),
    "starcoderbase-1b": PaperLayout(16, 8, [], "our choice: DP 128"),
    "santacoder": PaperLayout(12, 8, [], "paper: 96 GPUs, DP 96, global batch 192"),
    "starcoder2-15b": PaperLayout(128, 8, [], "model card: 1024 GPUs; TP 4 with sequence parallel (preset), DP 256"),
    "starcoder2-7b": PaperLayout(24, 8, [], "our choice: TP 2 (preset), DP 96 divides global batch 864"),
    "starcoder2-3b": PaperLayout(16, 8, [], "our choice: DP 128, global batch 640"),
}
