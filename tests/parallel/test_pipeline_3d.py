"""Pipeline parallelism composed with tensor, sequence and data parallelism, and checkpoints
that reshard across stages. One 4-rank and one 8-rank gloo world (each started once).

4 ranks: PP 4 (1f1b), TP 2 x PP 2 with SP (1f1b and zero-bubble, whose all-gathers are counted),
PP 2 x DP 2 with the distributed optimizer.
8 ranks: TP 2 x PP 2 x DP 2, saved at step 5 and resumed at TP 1 x PP 4 x DP 2, TP 4 x PP 1 x
DP 2 and in one process; its checkpoint exported to Hugging Face. tiny-sc1 (tied, MQA).
Real processes: SIGKILL at TP 2 x PP 2 and restart.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

import starcoder
from starcoder.cli import main as starcoder_main
from starcoder.convert.checkpoints import latest_checkpoint, read_state
from starcoder.training.trainer import train
from tests.distributed import World
from tests.parallel.pipeline_helpers import (PRESET_SETS, SMALL, TOL, close, config, copies_differ,
                                             grad_norms, layout, matches, resume_from,
                                             train_losses, train_rank)
from tests.training.helpers import make_corpus, metrics
from tests.training.test_launch import free_port

pytestmark = pytest.mark.usefixtures("one_thread")

PRESET = "tiny-sc1"
CASES_4 = {
    "pp4-1f1b": layout(1, 4, "parallel.pipeline_schedule=1f1b"),
    "tp2-pp2-sp": layout(2, 2, sp=True),
    "pp2-dp2-zero": layout(1, 2, "parallel.distributed_optimizer=true"),
    "tp2-pp2-sp-zero-bubble": layout(2, 2, "parallel.pipeline_schedule=zero_bubble", sp=True),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("pp3d")


@pytest.fixture(scope="module")
def corpus(root):
    return make_corpus(root / "corpus")


@pytest.fixture(scope="module")
def reference(root, corpus):
    train(config(PRESET, corpus, root / "reference"))
    return root / "reference"


def _tp_all_gathers(preset: str, corpus: str, out: str, overrides: list[str]) -> tuple[int, int, int]:
    """The TP all-gathers of this rank in a step after the first (whose schedule also runs a shape
    inference), with its micro-batches and blocks."""
    from starcoder.data import build_train_loader
    from starcoder.parallel.comm_accounting import CommAccounting
    from starcoder.training.trainer import Trainer

    trainer = Trainer(config(preset, corpus, out, *overrides))
    g = trainer.grid
    batches = iter(build_train_loader(trainer.cfg, trainer.tokenizer, dp_rank=g.dp_rank, dp_size=g.dp,
                                      consumed_samples=0))
    try:
        trainer.train_step([next(batches) for _ in range(trainer.accum)], 1e-3)
        with CommAccounting({"tp": g.group("tp")}) as accounting:
            trainer.train_step([next(batches) for _ in range(trainer.accum)], 1e-3)
    finally:
        trainer.close()
    gathers = sum(c.group == "tp" and c.kind == "all_gather" for c in accounting.calls)
    return gathers, trainer.accum, len(trainer.model.blocks)


@pytest.fixture(scope="module")
def runs4(root, corpus):
    with World(4) as world:
        out = {name: (root / name, world.run(train_rank, PRESET, corpus, str(root / name), sets))
               for name, sets in CASES_4.items()}
        out["zero-bubble all-gathers"] = world.run(_tp_all_gathers, PRESET, corpus, str(root / "count"),
                                                   CASES_4["tp2-pp2-sp-zero-bubble"])
        return out


@pytest.fixture(scope="module")
def runs8(root, corpus):
    """TP 2 x PP 2 x DP 2 (10 steps, checkpoints at 5 and 10), then its step-5 checkpoint resumed
    at TP 1 x PP 4 x DP 2 and TP 4 x PP 1 x DP 2."""
    out = {}
    with World(8) as world:
        source = root / "tp2-pp2-dp2"
        out["tp2-pp2-dp2"] = source, world.run(train_rank, PRESET, corpus, str(source), layout(2, 2, sp=True))
        for name, sets in {"to-tp1-pp4-dp2": layout(1, 4), "to-tp4-pp1-dp2": layout(4, 1, sp=True)}.items():
            folder = resume_from(source, 5, root / name)
            out[name] = folder, world.run(train_rank, PRESET, corpus, str(folder), sets)
    return out


@pytest.mark.parametrize("name", sorted(CASES_4))
def test_4_ranks_give_the_single_process_numbers(runs4, reference, name):
    folder, per_rank = runs4[name]
    assert matches(folder, reference, TOL)
    assert copies_differ(per_rank) == []  # tied copies, TP copies, DP replicas


def test_zero_bubble_gathers_each_saved_shard_once(runs4):
    """Under the zero-bubble schedule (input gradients and weight gradients in separate passes),
    each rank's TP all-gathers per micro-batch are what one backward does: per block the attention
    and MLP inputs forward, the two output gradients and the two saved input shards backward;
    plus the embedding's output gradient (first stage) or the output layer's input (last)."""
    for gathers, micro_batches, blocks in runs4["zero-bubble all-gathers"]:
        assert blocks == 2
        assert gathers == micro_batches * (6 * blocks + 1)


def test_tp2_pp2_dp2_gives_the_single_process_numbers(runs8, reference):
    folder, per_rank = runs8["tp2-pp2-dp2"]
    world = read_state(latest_checkpoint(folder))["world"]
    assert (world["tp"], world["pp"], world["dp"]) == (2, 2, 2)
    assert matches(folder, reference, TOL)
    assert copies_differ(per_rank) == []


def test_a_tp2_pp2_dp2_checkpoint_resumes_at_other_layouts(runs8, root, corpus):
    source, _ = runs8["tp2-pp2-dp2"]
    one = resume_from(source, 5, root / "to-one-process")
    train(config(PRESET, corpus, one))
    for folder in (one, runs8["to-tp1-pp4-dp2"][0], runs8["to-tp4-pp1-dp2"][0]):
        assert train_losses(folder)[:5] == train_losses(source)[:5]
        assert close(train_losses(folder)[5:], train_losses(source)[5:], abs_tol=TOL), folder.name
        assert close(grad_norms(folder)[5:], grad_norms(source)[5:], rel_tol=TOL), folder.name


def test_a_pipeline_checkpoint_exports_to_hugging_face(runs8, tmp_path):
    folder, _ = runs8["tp2-pp2-dp2"]
    hf_dir = tmp_path / "hf"
    assert starcoder_main(["convert", "to-hf", "--checkpoint", str(folder), "--output", str(hf_dir)]) == 0
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ours = starcoder.load_model(folder)
    ids = torch.randint(0, 8192, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
        assert ref.std() > 0.1
        assert (ours(ids) - ref).abs().max() <= 1e-4


def _launch(code: str, run, port: str) -> list[subprocess.Popen]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": port}
    return [subprocess.Popen([sys.executable, "-c", code],
                             env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for r in range(4)]


def test_sigkill_mid_run_at_tp2_pp2_then_restart_is_bit_identical(runs4, corpus, root):
    """Four real processes at TP 2 x PP 2 kill themselves (SIGKILL) in step 8, after the
    checkpoint of step 5; a restart from it logs what the uninterrupted 4-rank run logged."""
    run = root / "killed"
    args = ["train", "--config", PRESET]
    for item in [*SMALL, *PRESET_SETS[PRESET], f"data.paths=[{corpus}]", f"train.output_dir={run}",
                 *CASES_4["tp2-pp2-sp"]]:
        args += ["--set", item]
    killer = textwrap.dedent(f"""
        import os, signal, sys
        from starcoder.training import trainer
        real = trainer.Trainer.train_step
        def train_step(self, micro_batches, lr):
            if self.state.step == 7:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, micro_batches, lr)
        trainer.Trainer.train_step = train_step
        from starcoder.cli import main
        sys.exit(main({args!r}))
    """)
    restart = f"import sys\nfrom starcoder.cli import main\nsys.exit(main({args!r}))"
    for code, expected in ((killer, -signal.SIGKILL), (restart, 0)):
        procs = _launch(code, run, str(free_port()))
        try:
            outputs = [p.communicate(timeout=300)[0] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        assert [p.returncode for p in procs] == [expected] * 4, outputs
        if expected:
            assert latest_checkpoint(run).name == "step_0000005"
    assert "resumed from" in outputs[0]
    keys = ("step", "loss", "grad_norm", "lr", "val_loss")
    reference, _ = runs4["tp2-pp2-sp"]
    assert [[r.get(k) for k in keys] for r in metrics(run)] == \
        [[r.get(k) for k in keys] for r in metrics(reference)]
