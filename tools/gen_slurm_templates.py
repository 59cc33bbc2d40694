"""Write tools/train.sbatch and tools/slurm/<preset>.sbatch from the same function that writes
`starcoder launch`'s scripts (starcoder.launch.render), so they cannot drift; a test checks that
the files in the repository are what this writes. Run after changing starcoder/launch/."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from starcoder.config import load_config  # noqa: E402
from starcoder.launch.layouts import PAPER_LAYOUTS  # noqa: E402
from starcoder.launch.script import SlurmJob, render  # noqa: E402


def templates() -> dict[Path, str]:
    out = {ROOT / "tools" / "train.sbatch": render(SlurmJob(
        run_dir="runs/default", config=None, nodes=1, gpus_per_node=8,
        title="the generic template: pass --config and --set to sbatch after the script and name "
              "the run folder with RUN and --output, e.g. `mkdir -p /ckpt/sc2-3b && sbatch --nodes=4 "
              "--export=ALL,RUN=/ckpt/sc2-3b --output=/ckpt/sc2-3b/slurm-%j.out tools/train.sbatch "
              "--config starcoder2-3b --set data.paths=[/data/stack] --set "
              "data.tokenizer=/models/starcoder2`"))}
    for preset, layout in PAPER_LAYOUTS.items():
        run_dir = load_config(preset).train.output_dir
        out[ROOT / "tools" / "slurm" / f"{preset}.sbatch"] = render(SlurmJob(
            run_dir=run_dir, config=preset, overrides=layout.overrides, nodes=layout.nodes,
            gpus_per_node=layout.gpus_per_node, job_name=preset,
            title=f"the {preset} template at {layout.nodes} nodes x {layout.gpus_per_node} GPUs "
                  f"({layout.source}); add --set data.paths=[...] --set data.tokenizer=... to "
                  f"sbatch, mkdir -p {run_dir} first (SLURM opens its log there), submit from the "
                  f"repository root, or check it with `starcoder launch --config {preset} "
                  f"--nodes {layout.nodes} ... --dry-run`"))
    return out


if __name__ == "__main__":
    for path, text in templates().items():
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
