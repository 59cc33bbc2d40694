"""`train.objective: sft` in one process: the step's loss is the LM loss under the stored loss mask
(prompt tokens get none, response tokens and EOS do), token- or example-normalised, computed here
by hand from the files; `train.epochs` and `train.warmup_ratio` set the run's length and warmup;
document masking is refused under pipeline parallelism."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from starcoder.config import ConfigError, load_config
from starcoder.data import build_train_loader
from starcoder.data.indexed import IndexedMask, IndexedTokens
from starcoder.data.packing import example_rows
from starcoder.training.schedule import lr_at
from starcoder.training.trainer import Trainer, check_supported, train
from tests.training.helpers import metrics, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(prefix, out, *overrides):
    return tiny_config(prefix, out, "data.fim_rate=0", "train.objective=sft", "data.split=100,0,0",
                       "train.max_steps=1", *overrides)


def _label_masks(prefix: str, tokens: torch.Tensor) -> torch.Tensor:
    """The loss mask of unpacked rows, read from the files: the row's example is found by its
    tokens, the label of position t is token t + 1, padding gets nothing."""
    data, masks = IndexedTokens(prefix), IndexedMask(f"{prefix}_loss_mask")
    out = torch.zeros(tokens.shape[0], tokens.shape[1] - 1)
    for r, row in enumerate(tokens.numpy()):
        (ex,) = [i for i in range(len(data))
                 if np.array_equal(row[:min(len(data[i]), len(row))], data[i][:len(row)])]
        mask = np.asarray(masks[ex][:len(row)], dtype=np.float32)
        out[r, :len(mask) - 1] = torch.from_numpy(mask[1:])
    return out


@pytest.mark.parametrize("normalisation", ["token", "example"])
def test_sft_loss_is_the_lm_loss_under_the_stored_mask(sft_corpus, tmp_path, normalisation):
    cfg = _cfg(sft_corpus, tmp_path, f"train.loss_normalization={normalisation}")
    trainer = Trainer(cfg)
    before = copy.deepcopy(trainer.model).eval()
    loader = build_train_loader(cfg, trainer.tokenizer, dp_rank=0, dp_size=1, consumed_samples=0)
    micro = [next(loader) for _ in range(trainer.accum)]
    loss, _ = trainer.train_step(micro, lr=0.0)
    tokens = torch.cat([mb["tokens"] for mb in micro])
    with torch.no_grad():
        logits = before(tokens[:, :-1]).double()
    ce = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    mask = _label_masks(sft_corpus, tokens).double()
    # the prompt is never a label, every response token and the closing EOS are
    eod = trainer.tokenizer.eod_id
    for row, m in zip(tokens, mask):
        labels = row[1:][m > 0].tolist()
        assert labels[-1] == eod and trainer.tokenizer.decode(labels).count("Q: ") == 0
    assert 0 < mask.sum() < (tokens[:, 1:] != eod).sum()
    if normalisation == "token":
        expected = (ce * mask).sum() / mask.sum()
    else:  # OctoPack's norm_target_loss: each example's own mean, then the mean over examples
        expected = ((ce * mask).sum(1) / mask.sum(1)).mean()
    assert math.isclose(loss, expected.item(), rel_tol=1e-6)
    all_tokens = (ce * (tokens[:, 1:] != eod)).sum() / (tokens[:, 1:] != eod).sum()
    # the mask matters (an untrained model is near ln(vocab) everywhere: the gap is small)
    assert not math.isclose(loss, all_tokens.item(), rel_tol=1e-5)
    trainer.close()


def test_epochs_and_warmup_ratio_set_the_run(sft_corpus, tmp_path):
    cfg = _cfg(sft_corpus, tmp_path, "train.epochs=2", "train.warmup_ratio=0.3", "train.warmup_steps=0",
               "train.lr_schedule=linear", "train.lr=1e-5", "train.min_lr=0", "train.lr_decay_steps=null",
               "data.pack=true", "data.document_mask=false")
    _, rows = example_rows([sft_corpus], "100,0,0", 0, 32, True, cfg.train.seed, True)
    steps = math.ceil(2 * len(rows) / cfg.train.global_batch_size)
    state = train(cfg)
    assert state.step == steps and cfg.train.max_steps == 1  # the caller's config is not changed
    logged = [r["lr"] for r in metrics(tmp_path) if "lr" in r]
    warmup = math.ceil(0.3 * steps)
    assert len(logged) == steps and logged[0] == pytest.approx(1e-5 / warmup)
    assert logged[warmup - 1] == pytest.approx(1e-5) and logged[-1] == pytest.approx(0.0)
    resolved = load_config(tmp_path / "config.yaml")  # the run's record holds the computed length
    assert resolved.train.max_steps == steps
    assert [lr_at(s, resolved.train) for s in range(1, steps + 1)] == pytest.approx(logged)


@pytest.mark.parametrize("overrides, message", [
    (["train.warmup_ratio=0.1", "train.warmup_steps=5"], "train.warmup_ratio: set train.warmup_steps"),
    (["train.warmup_ratio=1.0"], r"train.warmup_ratio: must be in \[0, 1\)"),
    (["train.epochs=0"], "train.epochs: must be at least 1"),
    (["train.lr=1e-5"], r"train.min_lr: 3e-05 must be in \[0, train.lr \(1e-05\)\]"),
    (["train.objective=ppo"], "train.objective: 'ppo' is not one of lm | sft | dpo"),
    (["train.loss_normalization=sequence"], "train.loss_normalization: 'sequence' is not one of"),
])
def test_schedule_and_objective_keys_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny-sc2", ["train.min_lr=3e-5", *overrides])
    assert load_config("tiny-sc2", ["train.lr=1e-5", "train.min_lr=0"]).train.min_lr == 0  # recipes


def test_pipeline_parallel_refuses_document_masking(sft_corpus, tmp_path):
    cfg = _cfg(sft_corpus, tmp_path, "parallel.pipeline_parallel=2", "data.pack=true")
    with pytest.raises(ConfigError, match="data.document_mask: not available under pipeline"):
        check_supported(cfg)
    cfg.data.document_mask = False
    check_supported(cfg)
    cfg.train.loss_normalization = "example"
    with pytest.raises(ConfigError, match="train.loss_normalization: example is not available"):
        check_supported(cfg)


def test_packed_sft_step_equals_each_example_run_alone(sft_corpus, tmp_path):
    """End to end through the loader, the trainer and the model: with packing (document masking on
    by default) the step's loss is that of every packed example run through the model by itself."""
    cfg = _cfg(sft_corpus, tmp_path, "data.pack=true")
    trainer = Trainer(cfg)
    before = copy.deepcopy(trainer.model).eval()
    loader = build_train_loader(cfg, trainer.tokenizer, dp_rank=0, dp_size=1, consumed_samples=0)
    micro = [next(loader) for _ in range(trainer.accum)]
    assert all("document_ids" in mb for mb in micro)
    loss, _ = trainer.train_step(micro, lr=0.0)
    total, count, packed_rows = 0.0, 0.0, 0
    with torch.no_grad():
        for mb in micro:
            for tokens, mask, docs in zip(mb["tokens"], mb["loss_mask"], mb["document_ids"]):
                packed_rows += len(docs[:-1].unique()) > 1
                for d in docs.unique():
                    where = (docs == d).nonzero().flatten()
                    a, b = where[0].item(), where[-1].item() + 1
                    if b - a < 2:
                        continue
                    logits = before(tokens[None, a:b - 1]).double()[0]
                    ce = F.cross_entropy(logits, tokens[a + 1:b], reduction="none")
                    # position b-1 predicts the next example's first token: masked out
                    assert b > len(mask) or mask[b - 1] == 0
                    total += (ce * mask[a:b - 1].double()).sum().item()
                    count += mask[a:b - 1].sum().item()
    assert packed_rows > 0  # rows really hold several examples
    assert math.isclose(loss, total / count, rel_tol=1e-5)
    trainer.close()
