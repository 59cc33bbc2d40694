"""Per-step metrics: `metrics.jsonl`, a console line, a progress bar, TensorBoard and wandb.

MFU = model FLOPs per token (`starcoder.models.flops`: 6N plus attention, no recomputation) x
tokens/s / (peak FLOP/s per device x devices). The peak comes from a table of dense bf16 (fp16 on
V100) tensor-core numbers by device name, or from `log.peak_tflops`; a CPU has none, so MFU is
null there.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import resource
import sys
from pathlib import Path

import torch

from starcoder.config import Config, ConfigError

log = logging.getLogger("starcoder.train")

# Dense (not 2:4 sparse) tensor-core TFLOP/s from the vendor datasheets, most specific name first.
PEAK_TFLOPS = (
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("H200", 989.0),  # also GH200
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("V100", 125.0),
)


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """Peak TFLOP/s of one device: `override` if given, the table's entry for a known GPU, else None."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    return lookup_peak(torch.cuda.get_device_name(device))


def lookup_peak(device_name: str) -> float | None:
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None, devices: int) -> float | None:
    """Model FLOPs utilisation as a fraction of the devices' peak (None without a peak)."""
    if peak is None:
        return None
    return flops_per_token * tokens_per_s / (peak * 1e12 * devices)


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated device memory on a GPU; the process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLogger:
    """Writes records on rank 0 (`enabled`); every other rank gets a logger that does nothing.

    On resume, records after the resumed step move from `metrics.jsonl` to the end of
    `metrics.superseded.jsonl`, so the first reads as one uninterrupted run and nothing is lost.
    """

    def __init__(self, cfg: Config, run_dir: Path, enabled: bool, start_step: int):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tensorboard = self.wandb = self.bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_after(self.path, start_step)
        self._file = self.path.open("a")
        lg = cfg.log
        if lg.tensorboard:
            self.tensorboard = _tensorboard(Path(run_dir) / "tensorboard", start_step)
        if lg.wandb:
            self.wandb = _wandb(cfg, run_dir)
        show_bar = sys.stderr.isatty() if lg.progress_bar is None else lg.progress_bar
        if show_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.train.max_steps, initial=start_step, unit="step",
                            dynamic_ncols=True, file=sys.stderr)

    def log(self, record: dict) -> None:
        """One record (must hold `step`): a JSON line, a console line and scalars."""
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        self.echo(console_line(record))
        step = record["step"]
        scalars = {k: v for k, v in clean.items() if k != "step" and isinstance(v, (int, float))}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(f"train/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def echo(self, line: str) -> None:
        """A console line that does not tear the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            log.info(line)

    def advance(self, step: int, loss: float | None = None) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def console_line(r: dict) -> str:
    if "val_ppl" in r:
        return f"step {r['step']:>7} | validation loss {r['val_loss']:.4f} | ppl {r['val_ppl']:.2f}"
    if "val_rewards/margins" in r:  # DPO's validation
        return (f"step {r['step']:>7} | validation loss {r['val_loss']:.4f} | reward accuracy "
                f"{r['val_rewards/accuracies']:.3f} | margin {r['val_rewards/margins']:.4f}")
    if "lr" not in r:  # other evaluations (e.g. HumanEval): their own keys
        return " | ".join([f"step {r['step']:>7}"] + [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in r.items() if k != "step"])
    parts = [f"step {r['step']:>7}", f"loss {_num(r.get('loss'), '.4f')}", f"lr {r['lr']:.3e}",
             f"grad {_num(r.get('grad_norm'), '.3f')}", f"{r['tokens_per_s']:,.0f} tok/s"]
    if r.get("mfu") is not None:
        parts.append(f"mfu {100 * r['mfu']:.1f}%")
    parts.append(f"mem {r['mem_gib']:.2f} GiB")
    if r.get("skipped_steps"):
        parts.append(f"skipped {r['skipped_steps']}")
    return " | ".join(parts)


def _num(value, fmt: str) -> str:
    return "nan" if value is None or not math.isfinite(value) else format(value, fmt)


def _truncate_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    keep = [line for line in lines if _step_of(line) <= step]
    if len(keep) == len(lines):
        return
    with open(path.with_name("metrics.superseded.jsonl"), "a") as f:
        f.writelines(line + "\n" for line in lines if _step_of(line) > step)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _step_of(line: str) -> float:
    """The step of a record; a line torn by a kill mid-write counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def _tensorboard(folder: Path, start_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("log.tensorboard: the tensorboard package is not installed; not writing events")
        return None
    # purge_step hides events a killed run wrote after the checkpoint it resumes from
    return SummaryWriter(str(folder), purge_step=start_step + 1 if start_step else None)


def check_logging(cfg: Config) -> None:
    """Fail at start-up, on every rank, for a logger that was asked for but cannot run."""
    if cfg.log.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("log.wandb: the wandb package is not installed (pip install wandb, "
                          "or set log.wandb: false)")


def _wandb(cfg: Config, run_dir: Path):
    import wandb

    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return wandb.init(project=cfg.log.wandb_project, name=cfg.log.wandb_run_name, dir=str(run_dir),
                      config=cfg.to_dict(), mode=mode, resume="allow")
