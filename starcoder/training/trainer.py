"""The training loop.

One step: fetch the step's micro-batches, count their loss tokens across data-parallel ranks,
then for each micro-batch run forward and backward on sum(token losses x loss mask) x loss scale /
(this rank's sum of the loss mask in the step): each rank scales its own share, as Megatron does, so fp16 gradients
do not shrink with the data-parallel size. Before the data-parallel sum (DDP with a sum hook)
each rank weights its gradients by its share of the global token count, so the gradient and
the logged loss are the token mean over the global batch whatever the layout: 1 process x 4
micro-batches and 2 processes x 2 give the same numbers. Then the global gradient norm decides
(the same way on every rank) whether the step is taken or skipped as non-finite, gradients are
clipped and AdamW steps. The loss mask is what the loader gives: ones for pretraining, the
stored mask for `train.objective: sft`, or per-example weights (1 / the example's loss tokens)
for `train.loss_normalization: example`, which makes the same normalisation a mean over examples.
A micro-batch with "document_ids" (document masking) passes them to the model. Under
`train.objective: dpo` (starcoder.finetune.dpo) the loss is per pair instead: the same weighting
with pairs for tokens, so it is the mean over the global batch's pairs.

Everything a resumed run needs is in the checkpoint: weights, Adam state, RNG states and the JSON
`TrainState` (step, consumed samples; the learning rate is a function of the step, and the data
order a function of consumed samples), so a run killed after a checkpoint and restarted logs
the same losses as one that was never interrupted.

When a run ends it writes `<output_dir>/stop.json` ({"reason": "finished" | "signal" | "failed",
"step", ...}); a run killed outright leaves none. A launcher that decides about a restart reads
this marker, not the exit code of torchrun.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from starcoder.convert.weights import load_weights, resolve_folder
from starcoder.config import Config, ConfigError, UserError, accumulation_steps
from starcoder.data import (build_train_loader, build_valid_loader, document_mask_enabled,
                            load_tokenizer, resolve_epochs)
from starcoder.data.loader import build_pair_dataset, build_valid_pairs
from starcoder.finetune.dpo import DPO, dpo_config
from starcoder.finetune.lora import apply_lora
from starcoder.models.attention import check_window_dropout
from starcoder.models.flops import model_flops_per_token
from starcoder.models.gpt import GPT
from starcoder.models.init import init_weights
from starcoder.parallel import (Grid, Pipeline, any_nonfinite, clip_grad_norm_, grad_norm,
                                init_grid, materialize, parallelize, reduce_data_parallel_grads,
                                reduce_replicated_grads, split_model)
from starcoder.convert.checkpoints import read_config
from starcoder.training.checkpoint import (find_resume, load_checkpoint, remove_partial,
                                           save_checkpoint, warn_changed_settings)
from starcoder.training.distributed import resolve_device
from starcoder.training.metrics import (MetricsLogger, check_logging, mfu, peak_memory_gib,
                                        peak_tflops)
from starcoder.parallel.distributed_optimizer import DistributedOptimizer
from starcoder.training.optimizer import build_optimizer, set_lr
from starcoder.training.precision import DTYPES, LossScaler, resolve_precision
from starcoder.training.profiling import StepProfiler
from starcoder.training.schedule import lr_at
from starcoder.training.signals import StopRequest

log = logging.getLogger("starcoder.train")
STOP_MARKER = "stop.json"


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps)."""


@dataclass
class TrainState:
    """The JSON part of a checkpoint."""

    step: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0  # non-finite steps (fp16 overflows that only lower the scale excluded)
    # Sums since the last logged step, so a resumed run logs the same interval averages.
    interval_loss: float = 0.0
    interval_steps: int = 0


def train(cfg: Config, stop: StopRequest | None = None) -> TrainState:
    """Train, or resume from `<output_dir>/checkpoints/latest`, as configured. Runs in this
    process alone, or as one rank of an initialised process group (see `distributed_session`).
    `stop`: signal handlers installed by the caller (the CLI installs them before anything slow,
    so a signal during start-up cannot kill the process); by default installed here."""
    trainer = Trainer(cfg)
    try:
        with contextlib.ExitStack() as stack:
            state = trainer.run(stop or stack.enter_context(StopRequest()))
    except BaseException as err:
        trainer.write_stop_marker("failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        trainer.close()
    trainer.write_stop_marker("signal" if trainer.stopped_by else "finished")
    return state


# --------------------------------------------------------------------------------------------
# Set-up


def check_supported(cfg: Config) -> None:
    if cfg.train.eval_humaneval_every and cfg.parallel.pipeline_parallel > 1:
        raise ConfigError("train.eval_humaneval_every: not available under pipeline parallelism "
                          "(generation needs the whole model on each tensor-parallel group); "
                          "set 0, or evaluate saved checkpoints with `starcoder eval`")
    if cfg.data.tokenizer is None:
        raise ConfigError("data.tokenizer: required for training (a tokenizer.json, a folder "
                          "holding one, or builtin:tiny)")
    if not cfg.data.paths:
        raise ConfigError("data.paths: no training data (prefixes of .bin/.idx pairs written by "
                          "`starcoder preprocess`)")
    if cfg.parallel.pipeline_parallel > 1:
        if document_mask_enabled(cfg):
            raise ConfigError("data.document_mask: not available under pipeline parallelism (the "
                              "schedule passes only input ids between stages); set false (it is "
                              "on by default with data.pack), or use pipeline_parallel 1")
        if cfg.train.loss_normalization == "example":
            raise ConfigError("train.loss_normalization: example is not available under pipeline "
                              "parallelism (the schedule's loss counts tokens, not weights); use "
                              "token, or pipeline_parallel 1")


def build_model(cfg: Config, grid: Grid, device: torch.device) -> GPT:
    """The model for this rank: built on the meta device, split for tensor parallelism, cut to
    this rank's pipeline stages, then materialised and initialised (each full tensor drawn from
    the seed, then sliced, so every layout starts from the same weights); with LoRA, frozen and
    given adapters."""
    with torch.device("meta"):
        model = GPT(cfg.model, padded_vocab_size=cfg.model.padded_vocab_size(grid.tp))
        parallelize(model, grid)  # collective; nothing to do at tensor parallel 1
        if grid.pp > 1:
            split_model(model, cfg.parallel, grid.pp_rank)
    materialize(model, device)
    init_weights(model, cfg.model, cfg.train.seed)
    if cfg.finetune.lora_rank:  # frozen base (train.init_from fills it), trainable adapters
        apply_lora(model, cfg, grid)
    model.set_kernels(cfg.model.kernels, device, DTYPES[resolve_precision(cfg.train, device)])
    if cfg.train.compile:
        model.compile()
    return model.train()


def _sum_gradients(trainer, bucket):
    """DDP communication hook: this rank's gradients (of its own token mean) weighted by its share
    of the global token count, then all-reduced with SUM (DDP's default averages)."""
    bucket.buffer().mul_(trainer.token_share)
    work = dist.all_reduce(bucket.buffer(), group=trainer.grid.group("dp"), async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


# --------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    def __init__(self, cfg: Config):
        check_supported(cfg)
        cfg = resolve_epochs(cfg)  # train.epochs -> train.max_steps, from the data's size
        if cfg.train.objective == "dpo":
            cfg = dpo_config(cfg)
        check_logging(cfg)
        self.cfg, t = cfg, cfg.train
        self.device = resolve_device(t.device)
        check_window_dropout(cfg.model, t.seq_length, self.device.type)
        self.grid = init_grid(cfg.parallel, self.device.type)
        self.accum = accumulation_steps(t, self.grid.dp)
        self.precision = resolve_precision(t, self.device)
        try:
            self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        except (OSError, ValueError) as err:
            raise ConfigError(f"data.tokenizer: {err}") from None
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the "
                              f"tokenizer's vocabulary ({self.tokenizer.vocab_size})")
        self.run_dir = Path(t.output_dir)
        self.rank0 = self.grid.rank == 0
        if self.rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_partial(self.run_dir)
            (self.run_dir / STOP_MARKER).unlink(missing_ok=True)  # a stale one would mislead
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())

        torch.manual_seed(t.seed)
        self.model = build_model(cfg, self.grid, self.device)
        resume, metadata = find_resume(self.run_dir, self.grid, t.verify_checksums)
        self.init_folder = None  # the folder the policy is loaded from (verified), not on a resume
        if resume is None and t.init_from:  # into the fp32 model, before the optimizer copies it
            try:
                self.init_folder = resolve_folder(t.init_from)
                load_weights(self.model, self.init_folder, self.grid)
            except UserError as err:
                raise ConfigError(f"train.init_from: {err}") from None
            log.info("initialised weights from %s", t.init_from)
        self.dpo = None
        if t.objective == "dpo":  # the reference is the initial policy, also after a resume
            self.dpo = DPO(cfg, self.model, self._initial_model, self.device)
        self.optimizer = build_optimizer(self.model, cfg, self.grid, self.device, self.precision)
        self.scaler = LossScaler.for_precision(self.precision, t)
        self.state = TrainState()
        self.last_saved = self.stopped_by = None
        self.stop = StopRequest()  # replaced by the installed one in `run`
        if resume is not None:
            if self.rank0:
                warn_changed_settings(read_config(resume), cfg, resume)
            saved = load_checkpoint(resume, self.model, self.optimizer, self.grid, self.device, cfg,
                                    metadata)
            self.state = TrainState(**saved["train_state"])
            self.scaler.load_state_dict(saved["loss_scale"])
            self.last_saved = self.state.step
            log.info("resumed from %s (step %d, %d samples consumed)", resume, self.state.step,
                     self.state.consumed_samples)

        # The grad-buffer path reduces from its own hooks; otherwise torch's DDP does.
        self.buffered = isinstance(self.optimizer, DistributedOptimizer)
        self.ddp = self.model
        self.pipeline = None
        if self.grid.pp > 1:  # data-parallel gradients are summed after the schedule instead
            if t.eval_every and cfg.parallel.pipeline_schedule == "zero_bubble" and \
                    cfg.parallel.virtual_pipeline == 2:
                raise ConfigError("train.eval_every: validation cannot run under the ZB-V schedule "
                                  "(parallel.pipeline_schedule zero_bubble at virtual_pipeline 2: "
                                  "torch 2.13 fails its forward-only run); set 0, or use another "
                                  "schedule")
            self.pipeline = Pipeline(self.model, cfg.parallel, self.grid, self.accum, self.device)
        elif self.grid.dp > 1 and not self.buffered:
            self.ddp = DistributedDataParallel(
                self.model, process_group=self.grid.group("dp"),
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                bucket_cap_mb=cfg.parallel.ddp_bucket_mb, gradient_as_bucket_view=True)
            self.ddp.register_comm_hook(self, _sum_gradients)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.tokens_per_step = t.global_batch_size * t.seq_length * (2 if self.dpo else 1)
        self.flops_per_token = model_flops_per_token(cfg.model, t.seq_length)
        self.peak = peak_tflops(self.device, cfg.log.peak_tflops)
        self.logger = MetricsLogger(cfg, self.run_dir, self.rank0, self.state.step)
        self.profiler = StepProfiler(t.profile_steps, self.run_dir, self.device, self.grid.rank)
        self.step_metrics: dict = {}  # extra metrics of the last step (DPO's)

    def _initial_model(self) -> GPT:
        """The model as step 1 starts it: built from the seed, then `train.init_from`."""
        model = build_model(self.cfg, self.grid, self.device)
        if self.cfg.train.init_from:
            try:  # the policy's load has verified this folder already (not after a resume)
                load_weights(model, self.init_folder or self.cfg.train.init_from, self.grid,
                             verify=self.init_folder is None)
            except UserError as err:
                raise ConfigError(f"train.init_from: {err}") from None
        return model

    def run(self, stop: StopRequest) -> TrainState:
        cfg, t, state = self.cfg, self.cfg.train, self.state
        self.stop = stop
        if self.rank0:
            self.logger.echo(f"training {t.max_steps} steps from step {state.step}: "
                             f"{self.grid.world_size} process(es) on {self.device.type}, "
                             f"{self.accum} micro-batch(es) of {t.micro_batch_size} per rank per "
                             f"step, {self.precision}, output in {self.run_dir}")
        if self.dpo is not None and cfg.finetune.dpo_reference == "precomputed":
            valid = build_valid_pairs(cfg, self.tokenizer) if t.eval_every else None
            self.dpo.precompute(build_pair_dataset(cfg, self.tokenizer), valid, t.micro_batch_size,
                                self.grid.dp_rank, self.grid.dp,
                                self.grid.group("dp") if self.grid.dp > 1 else None)
        batches = iter(build_train_loader(cfg, self.tokenizer, dp_rank=self.grid.dp_rank,
                                          dp_size=self.grid.dp,
                                          consumed_samples=state.consumed_samples))
        self._interval_start, self._interval_tokens = time.perf_counter(), 0
        humaneval = self.humaneval_hook()
        while state.step < t.max_steps:
            signum = stop.agreed(self.device)
            if signum:
                self.stopped_by = signal.Signals(signum).name
                self.logger.echo(f"received {self.stopped_by}: stopping at step {state.step}")
                break
            micro_batches = [next(batches) for _ in range(self.accum)]  # the loader never ends
            self.profiler.before_step(state.step + 1)
            loss, norm = self.train_step(micro_batches, lr_at(state.step + 1, t))
            self._account(loss, norm)
            self.profiler.after_step(state.step)
            if t.eval_every and state.step % t.eval_every == 0:
                self.evaluate()
            if humaneval is not None:
                humaneval(state.step)
            if t.save_every and state.step % t.save_every == 0:
                self.save()
        if state.step > 0 and self.last_saved != state.step:
            self.save()
        return state

    def train_step(self, micro_batches: list[dict], lr: float) -> tuple[float, float]:
        """One optimizer step over the global batch; returns (loss, grad norm), both the same on
        every rank; non-finite values mean the step was skipped."""
        mask_sum = sum(float(mb["loss_mask"].sum()) if self.dpo is None else len(mb["pair_index"])
                       for mb in micro_batches)  # DPO: pairs for tokens
        count = self._dp_sum(torch.tensor([mask_sum], dtype=torch.float64, device=self.device)).item()
        # Each rank's own share: dividing the scale by the global count instead flushed 43% of
        # fp16 logit gradients to zero at StarCoder2-15B shapes (0.5% this way).
        scale = self.scaler.scale / max(mask_sum, 1.0)
        self.token_share = mask_sum / max(count, 1.0)  # read by the DDP hook and the grad buffer
        if self.buffered:
            self.optimizer.buffer.weight = self.token_share
        if self.pipeline is None:
            loss_sum = self._forward_backward(micro_batches, scale)
        else:
            loss_sum = self._forward_backward_pipeline(micro_batches, scale)
        loss = self._dp_sum(loss_sum) / max(count, 1.0)
        if self.dpo is not None:
            self.step_metrics = self.dpo.metrics(self._dp_sum, count)
        if self.buffered:
            self.optimizer.buffer.finish_grad_sync()
        if self.grid.tp > 1:
            reduce_replicated_grads(self.model, self.grid)
        norm = self._unscale_and_clip()
        skip = any_nonfinite(torch.stack([loss.float().reshape(()), norm]), self.grid)
        if not skip:
            set_lr(self.optimizer, lr)
            self.optimizer.step()
        self.scaler.update(not skip)
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item(), norm.item()

    def _forward_backward(self, micro_batches: list[dict], scale: float) -> torch.Tensor:
        """Forward and backward of each micro-batch in turn (DDP or the grad buffer reduces the
        data-parallel gradients from the last backward); returns this rank's sum of token losses."""
        loss_sum = torch.zeros(1, dtype=torch.float64, device=self.device)
        for i, mb in enumerate(micro_batches):
            tokens = mb["tokens"].to(self.device, non_blocking=True)
            mask = mb["loss_mask"].to(self.device, non_blocking=True)
            last = i == len(micro_batches) - 1
            if self.buffered:
                self.optimizer.buffer.sync = last
            sync = contextlib.nullcontext() if last or self.ddp is self.model else self.ddp.no_sync()
            with sync:
                losses = self.ddp(tokens[:, :-1], tokens[:, 1:], **self._documents(mb))
                summed = ((losses * mask).sum() if self.dpo is None
                          else self.dpo.loss_sum(losses, mb, tokens, mask))
                (summed * scale).backward()
            loss_sum += summed.detach()
        return loss_sum

    def _documents(self, mb: dict) -> dict:
        """The model's `document_ids` keyword when the micro-batch has them (document masking):
        the ids of the input tokens."""
        if "document_ids" not in mb:
            return {}
        return {"document_ids": mb["document_ids"][:, :-1].to(self.device, non_blocking=True)}

    def _forward_backward_pipeline(self, micro_batches: list[dict], scale: float) -> torch.Tensor:
        """The step's micro-batches through the pipeline schedule, then the tied-embedding and
        data-parallel gradient sums; returns the sum of token losses (held by the last stage,
        summed over the pipeline group so every rank has it)."""
        inputs, labels = self._pipeline_batch(micro_batches)
        if self.buffered:  # accumulate through the whole schedule, reduce after it
            self.optimizer.buffer.sync = False
        loss_sum = self.pipeline.step(inputs, labels, scale)
        if self.buffered:
            buffer = self.optimizer.buffer
            buffer.fold_grads()  # what a split (zero-bubble) backward left in .grad
            # Tied copies are summed before the data-parallel reduction (the sums commute), while
            # every rank still holds its whole local gradient.
            self.pipeline.reduce_tied_grads(main_grad=True)
        else:
            reduce_data_parallel_grads(self.params, self.grid, weight=self.token_share)
            self.pipeline.reduce_tied_grads()
        dist.all_reduce(loss_sum, group=self.grid.group("pp"))
        return loss_sum

    def _pipeline_batch(self, micro_batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's micro-batches as one batch the schedule splits again: input ids, and labels
        with masked-out positions set to -100 (their loss is then exactly 0, as the
        single-process loop's loss x mask)."""
        if "document_ids" in micro_batches[0]:
            raise ConfigError("data.document_mask: not available under pipeline parallelism yet "
                              "(stages pass one tensor, the hidden states, between them: no room "
                              "for document ids); set parallel.pipeline_parallel: 1 or "
                              "data.document_mask: false")
        tokens = torch.cat([mb["tokens"] for mb in micro_batches]).to(self.device)
        mask = torch.cat([mb["loss_mask"] for mb in micro_batches]).to(self.device)
        labels = tokens[:, 1:].masked_fill(mask == 0, -100)
        return tokens[:, :-1].contiguous(), labels

    def _unscale_and_clip(self) -> torch.Tensor:
        """Undo the loss scale, clip to `train.grad_clip`; returns the global norm before clipping."""
        clip, opt = self.cfg.train.grad_clip, self.optimizer
        if not self.buffered:
            if self.scaler.scale != 1.0:
                torch._foreach_mul_([p.grad for p in self.params if p.grad is not None],
                                    1.0 / self.scaler.scale)
            return clip_grad_norm_(self.params, clip, self.grid) if clip > 0 else grad_norm(self.params, self.grid)
        if self.scaler.scale != 1.0:
            opt.scale_grads(1.0 / self.scaler.scale)
        norm = opt.grad_norm()
        if clip > 0:
            opt.scale_grads((clip / (norm + 1e-6)).clamp(max=1.0))
        return norm

    def _account(self, loss: float, norm: float) -> None:
        """Advance the step; log, and count or stop on, non-finite steps."""
        cfg, t, state = self.cfg, self.cfg.train, self.state
        state.step += 1
        state.consumed_samples += t.global_batch_size
        self._interval_tokens += self.tokens_per_step
        finite = math.isfinite(loss) and math.isfinite(norm)
        if finite:
            state.interval_loss += loss
            state.interval_steps += 1
        elif not (self.scaler.dynamic and math.isfinite(loss)):
            state.skipped_steps += 1
            self.logger.echo(f"step {state.step}: non-finite loss ({loss}) or gradient norm ({norm}); "
                             f"step skipped on all ranks ({state.skipped_steps} so far, "
                             f"train.max_nonfinite_steps {t.max_nonfinite_steps})")
            if state.skipped_steps > t.max_nonfinite_steps:
                raise TrainingError(f"{state.skipped_steps} non-finite steps, more than "
                                    f"train.max_nonfinite_steps ({t.max_nonfinite_steps}); stopping")
        self.logger.advance(state.step, loss if finite else None)
        if state.step % cfg.log.every and state.step != t.max_steps:
            return
        elapsed = time.perf_counter() - self._interval_start
        tokens_per_s = self._interval_tokens / elapsed
        self.logger.log({
            "step": state.step,
            "loss": state.interval_loss / state.interval_steps if state.interval_steps else math.nan,
            "lr": lr_at(state.step, t),
            "grad_norm": norm,
            "tokens_per_s": tokens_per_s,
            "mfu": mfu(self.flops_per_token, tokens_per_s, self.peak, self.grid.world_size),
            "consumed_samples": state.consumed_samples,
            "mem_gib": peak_memory_gib(self.device),
            "skipped_steps": state.skipped_steps,
            "loss_scale": self.scaler.scale,
            **self.step_metrics,  # DPO's, of the logged step itself
        })
        state.interval_loss, state.interval_steps = 0.0, 0
        self._restart_interval()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-mean loss over the first `train.eval_steps` global batches of the validation split
        (under DPO the mean pair loss and DPO's metrics over those pairs)."""
        cfg = self.cfg
        loader = build_valid_loader(cfg, self.tokenizer, dp_rank=self.grid.dp_rank, dp_size=self.grid.dp)
        if loader is None:
            self.logger.echo(f"step {self.state.step}: no validation (data.split {cfg.data.split!r} "
                             "gives the validation split no documents)")
            return math.nan
        if self.dpo is not None:
            record = self.dpo.evaluate(islice(loader, cfg.train.eval_steps * self.accum),
                                       self._dp_sum)
            self.logger.log({"step": self.state.step, **record})
            self._restart_interval()
            return record["val_loss"]
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        if self.pipeline is None:
            for mb in islice(loader, cfg.train.eval_steps * self.accum):
                tokens = mb["tokens"].to(self.device)
                mask = mb["loss_mask"].to(self.device)
                losses = self.model(tokens[:, :-1], tokens[:, 1:], **self._documents(mb))
                totals[0] += (losses * mask).sum()
                totals[1] += mask.sum()
        else:
            self._evaluate_pipeline(iter(loader), totals)
        self.model.train()
        loss_sum, count = self._dp_sum(totals).tolist()
        loss = loss_sum / count if count else math.nan
        self.logger.log({"step": self.state.step, "val_loss": loss,
                         "val_ppl": math.exp(min(loss, 50.0))})
        self._restart_interval()
        return loss

    def _evaluate_pipeline(self, batches, totals: torch.Tensor) -> None:
        """Forward-only schedule runs of one step's micro-batches each; the last stage's loss sums
        are summed over the pipeline group into totals[0]."""
        loss_sum = torch.zeros(1, dtype=torch.float64, device=self.device)
        for _ in range(self.cfg.train.eval_steps):
            micro_batches = list(islice(batches, self.accum))
            if len(micro_batches) < self.accum:
                break
            inputs, labels = self._pipeline_batch(micro_batches)
            loss_sum += self.pipeline.evaluate(inputs, labels)
            totals[1] += sum(mb["loss_mask"].sum() for mb in micro_batches)
        dist.all_reduce(loss_sum, group=self.grid.group("pp"))
        totals[0] += loss_sum[0]

    def humaneval_hook(self):
        """`train.eval_humaneval_every`: HumanEval pass@1 every N steps (starcoder.eval.training);
        made before step 1, so a missing sandbox stops the run at once."""
        if not self.cfg.train.eval_humaneval_every:
            return None
        from starcoder.eval.training import HumanEvalHook

        return HumanEvalHook(self)

    def save(self) -> Path:
        start = time.perf_counter()
        state = {
            "format": 1,
            "train_state": dataclasses.asdict(self.state),
            "loss_scale": self.scaler.state_dict(),
            "world": {"size": self.grid.world_size, "dp": self.grid.dp, "tp": self.grid.tp,
                      "pp": self.grid.pp},
        }
        with self.stop.deferred():  # a signal now waits until the checkpoint has committed
            path = save_checkpoint(self.run_dir, self.state.step, self.model, self.optimizer,
                                   self.grid, self.device, self.cfg, self.tokenizer, state,
                                   self.cfg.train.keep_last)
        self.last_saved = self.state.step
        self.logger.echo(f"saved {path} in {time.perf_counter() - start:.1f}s")
        self._restart_interval()
        return path

    def close(self) -> None:
        self.logger.close()

    def write_stop_marker(self, reason: str, **extra) -> None:
        """`stop.json` in the run folder (rank 0): why and where this run stopped."""
        if not self.rank0:
            return
        marker = {"reason": reason, "step": self.state.step, "signal": self.stopped_by,
                  "checkpoint_step": self.last_saved, "time": time.time(), **extra}
        tmp = self.run_dir / f"{STOP_MARKER}.tmp"
        tmp.write_text(json.dumps(marker) + "\n")
        os.replace(tmp, self.run_dir / STOP_MARKER)

    def _restart_interval(self) -> None:
        """Throughput counts training only: evaluation and checkpoint time are left out."""
        self._interval_start, self._interval_tokens = time.perf_counter(), 0

    def _dp_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.grid.dp > 1:
            dist.all_reduce(tensor, group=self.grid.group("dp"))
        return tensor
