"""`starcoder launch --dry-run` at every preset template's paper layout (world size, data parallel
and accumulation checked against values computed by hand), the templates in tools/ equal to what
the launcher writes, and one failing dry run per kind of mistake (one line naming the key, exit 2,
no script written)."""

import subprocess
import sys
from pathlib import Path

import pytest

from starcoder.cli import main
from starcoder.config import load_config
from starcoder.launch.layouts import PAPER_LAYOUTS
from starcoder.planning import plan_layout

ROOT = Path(__file__).resolve().parents[2]

# preset: (nodes, world size, TP, PP, DP, micro-batches per rank per step), by hand from the
# presets' global and micro batch sizes (all micro-batch 1).
HAND = {
    "starcoder-15b": (64, 512, 4, 4, 32, 16),  # 512 / (1 x 32)
    "starcoderbase-7b": (64, 512, 2, 1, 256, 2),  # 512 / 256
    "starcoderbase-3b": (32, 256, 1, 1, 256, 1),
    "starcoderbase-1b": (16, 128, 1, 1, 128, 1),
    "santacoder": (12, 96, 1, 1, 96, 2),  # 192 / 96
    "starcoder2-15b": (128, 1024, 4, 1, 256, 4),  # 1024 / 256
    "starcoder2-7b": (24, 192, 2, 1, 96, 9),  # 864 / 96
    "starcoder2-3b": (16, 128, 1, 1, 128, 5),  # 640 / 128
}


@pytest.fixture
def data(tmp_path):
    """A data prefix and tokenizer that exist (a dry run checks existence, not content)."""
    for ext in (".bin", ".idx"):
        (tmp_path / f"corpus{ext}").write_bytes(b"")
    return [f"data.paths=[{tmp_path / 'corpus'}]", "data.tokenizer=builtin:tiny",
            f"train.output_dir={tmp_path / 'run'}"]


def dry_run(capsys, preset, nodes, overrides, *options):
    argv = ["launch", "--config", preset, "--nodes", str(nodes), "--dry-run", *options]
    for item in overrides:
        argv += ["--set", item]
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


@pytest.mark.parametrize("preset", sorted(HAND))
def test_every_template_layout_dry_runs(capsys, data, tmp_path, preset):
    layout = PAPER_LAYOUTS[preset]
    nodes, world, tp, pp, dp, accum = HAND[preset]
    assert layout.nodes == nodes and layout.gpus_per_node == 8
    code, out, err = dry_run(capsys, preset, nodes, [*layout.overrides, *data])
    assert code == 0 and err == [], err
    assert out[0] == (f"world size {world} ({nodes} nodes x 8 tasks) = TP {tp} x PP {pp} x DP {dp}; "
                      f"{accum} micro-batch(es) per rank per step")
    plan = plan_layout(load_config(preset, [*layout.overrides, *data]), nodes, 8)
    assert plan.fits and out[1] == (f"memory per GPU (starcoder plan): {plan.total / 2**30:.1f} GiB of "
                                    f"80 GiB, largest term {plan.dominant}")
    script = Path(out[-1])
    assert script == tmp_path / "run" / "launch.sbatch"
    text = script.read_text()
    for line in (f"#SBATCH --nodes={nodes}", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=B:USR1@600", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 f"#SBATCH --output={tmp_path / 'run'}/slurm-%j.out", "srun --kill-on-bad-exit=1 "):
        assert line in text, line
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_templates_are_what_the_launcher_writes():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from gen_slurm_templates import templates
    finally:
        sys.path.remove(str(ROOT / "tools"))
    written = templates()
    assert {p.name for p in written} == {"train.sbatch", *(f"{p}.sbatch" for p in PAPER_LAYOUTS)}
    for path, text in written.items():
        assert path.read_text() == text, f"{path} is stale: run python tools/gen_slurm_templates.py"


MISTAKES = {
    # kind: (preset, nodes, options, overrides, the key the one line names)
    "world size vs TP x PP": ("starcoder-15b", 1, ["--gpus-per-node", "6"], ["parallel.pipeline_parallel=4"],
                              "parallel.tensor_parallel: world size 6 (1 nodes x 6) is not divisible by "
                              "tensor_parallel x pipeline_parallel (4 x 4)"),
    "global batch vs DP": ("starcoder2-7b", 16, [], [],  # 128 GPUs / TP 2 = DP 64; 864 % 64 = 32
                           "train.global_batch_size: 864 is not divisible by train.micro_batch_size x "
                           "data-parallel size (1 x 64)"),
    "data path missing": ("starcoder2-3b", 16, [], ["data.paths=[/nonexistent/stack]"],
                          "data.paths[0]: /nonexistent/stack.bin/.idx not found"),
    "tokenizer missing": ("starcoder2-3b", 16, [], ["data.tokenizer=/nonexistent/tokenizer.json"],
                          "data.tokenizer: /nonexistent/tokenizer.json not found"),
    "output not writable": ("starcoder2-3b", 16, [], ["train.output_dir={tmp}/a_file/run"],
                            "train.output_dir: {tmp}/a_file is not a folder"),
    "memory over the GPU's": ("starcoder-15b", 64, ["--gpu-memory-gib", "16"], ["parallel.pipeline_parallel=4"],
                              "train.micro_batch_size: the per-GPU memory estimate 25.1 GiB exceeds 16 GiB "
                              "(largest term: activations); lower it, set model.recompute, or see "
                              "`starcoder plan --nodes N` for layouts that fit"),
    "signal after the time limit": ("starcoder2-3b", 16, ["--time", "00:05:00"], [],
                                    "--signal-lead: 600 s is not below the time limit --time 00:05:00 "
                                    "(300 s): USR1 would stop every run at once"),
}


@pytest.mark.parametrize("kind", sorted(MISTAKES))
def test_each_kind_of_mistake_is_one_line_naming_the_key(capsys, data, tmp_path, kind):
    preset, nodes, options, overrides, message = MISTAKES[kind]
    (tmp_path / "a_file").write_text("")
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    code, out, err = dry_run(capsys, preset, nodes, [*data, *overrides], *options)
    assert code == 2
    assert err == ["error: " + message.format(tmp=tmp_path)]
    assert not (tmp_path / "run" / "launch.sbatch").exists()
