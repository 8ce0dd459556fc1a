"""Run metrics: JSONL and TensorBoard writers, console progress, and model FLOPs utilisation (MFU).

`MetricsWriter` is the one sink for scalars during a run. `training_flops_per_token`, `device_peak_flops`
and `mfu` turn measured tokens/s into MFU.
"""

import json
import logging
import math
import os
import sys
from typing import Any, Self

import numpy as np
import tqdm
from tensorboardX import SummaryWriter

from tunix_core.errors import UserError

# tensorboardX warns on every non-finite scalar; NaN already shows in the console and as null in the JSONL,
# and the warning would break the progress bar at every write of a diverged run.
logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)

# Metric keys shown after the console progress bar (metric key, label); other keys go only to the files.
_CONSOLE_KEYS = (("loss", "loss"), ("eval/loss", "eval_loss"), ("tokens_per_sec", "tok/s"), ("mfu", "mfu"))


def _scalar(key: str, value: Any) -> int | float:
  """`value` (Python, numpy or JAX scalar) as a plain Python int or float."""
  array = np.asarray(value)
  if array.ndim != 0:
    raise ValueError(f"metric {key!r} must be a scalar, got shape {array.shape}")
  return int(array) if array.dtype.kind in "biu" else float(array)


def _console_value(label: str, value: int | float) -> str:
  if label == "mfu":
    return f"{100 * value:.1f}%"
  if label == "tok/s":
    return f"{value:,.0f}" if math.isfinite(value) else str(value)
  return f"{value:.4g}"


class MetricsWriter:
  """Writes each step's scalars to `<run_dir>/metrics.jsonl`, TensorBoard, and a console progress bar.

  Files:
    - `metrics.jsonl`: one JSON object per `write`, `{"step": step, **metrics}`, flushed to the OS at every
      write so `tail -f` follows it. A resumed run appends; nothing written before is removed, so a run
      resumed from an earlier checkpoint repeats some steps and readers should keep the last record per step.
      NaN and +-inf are written as `null` (strict JSON; TensorBoard keeps the real value).
    - `tensorboard/`: tensorboardX event files, one per writer; tags are the metric keys as given ("eval/loss").
      tensorboardX writes events from a background thread, so the training loop never waits on the disk;
      they reach the file within about a second and all of them by `close()`.

  Console: a tqdm bar over `total_steps` with loss, eval loss, tokens/s and MFU (keys "loss", "eval/loss",
  "tokens_per_sec", "mfu" as a fraction), when present. It starts at the first step reported, so a resumed
  run's rate and ETA count only this run's steps. When stdout is not a terminal (a log file, a cluster
  job), a bar's carriage returns make logs unreadable, so each `write` instead prints the same tqdm status
  as one plain line; `advance` then prints nothing.

  Only the primary process (`is_primary`, i.e. process 0) writes files or prints; elsewhere every method
  does nothing, so all processes can call it unconditionally.
  """

  def __init__(
      self,
      run_dir: str,
      *,
      enable_tensorboard: bool,
      total_steps: int,
      is_primary: bool = True,
      console: bool = True,
  ):
    self._active = is_primary
    self._console = is_primary and console
    self._total_steps = total_steps
    self._jsonl = None
    self._tensorboard = None
    self._bar = None
    self._bar_sink = None
    self._postfix: dict[str, str] = {}
    self._stdout = sys.stdout
    self._tty = self._stdout.isatty() if hasattr(self._stdout, "isatty") else False
    if not self._active:
      return
    if "://" in run_dir:
      raise UserError(
          f"metrics need a local run directory, got {run_dir!r}: mount the bucket (e.g. gcsfuse) and set"
          " base_output_directory to the mounted path"
      )
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "metrics.jsonl")
    needs_newline = False
    if os.path.exists(path) and os.path.getsize(path) > 0:
      # A crash mid-write can leave a partial last line; start on a fresh line so both records stay parseable.
      with open(path, "rb") as existing:
        existing.seek(-1, os.SEEK_END)
        needs_newline = existing.read(1) != b"\n"
    self._jsonl = open(path, "a", encoding="utf-8")
    if needs_newline:
      self._jsonl.write("\n")
      self._jsonl.flush()
    if enable_tensorboard:
      self._tensorboard = SummaryWriter(logdir=os.path.join(run_dir, "tensorboard"), flush_secs=1)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    """Records `metrics` (scalar values: Python, numpy or JAX) for `step` and moves the progress bar to it.

    `step` is the number of optimizer steps done (1 after the first step, `total_steps` after the last).
    """
    if not self._active:
      return
    if "step" in metrics:
      raise ValueError("metrics must not contain the key 'step'; pass the step as the first argument")
    values = {key: _scalar(key, value) for key, value in metrics.items()}
    record = {"step": int(step)}
    record.update({key: value if math.isfinite(value) else None for key, value in values.items()})
    self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
    self._jsonl.flush()
    if self._tensorboard is not None:
      for key, value in values.items():
        self._tensorboard.add_scalar(key, value, global_step=int(step))
      self._tensorboard.flush()
    if self._console:
      for key, label in _CONSOLE_KEYS:
        if key in values:
          self._postfix[label] = _console_value(label, values[key])
      self._move_bar(int(step))
      if not self._tty:
        print(str(self._bar), file=self._stdout, flush=True)

  def advance(self, step: int) -> None:
    """Moves the progress bar to `step` (steps done) without recording metrics."""
    if self._console:
      self._move_bar(int(step))

  def _move_bar(self, step: int) -> None:
    if self._bar is None:
      if self._tty:
        self._bar = tqdm.tqdm(total=self._total_steps, initial=step, unit="step", dynamic_ncols=True, file=self._stdout)
      else:
        # tqdm still keeps the rate and ETA, but draws into nothing; `write` prints its status line without a bar.
        self._bar_sink = open(os.devnull, "w")
        self._bar = tqdm.tqdm(
            total=self._total_steps,
            initial=step,
            unit="step",
            file=self._bar_sink,
            bar_format="{percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]",
        )
    self._bar.set_postfix(self._postfix, refresh=False)
    if step > self._bar.n:
      self._bar.update(step - self._bar.n)
    else:
      self._bar.refresh()

  def close(self) -> None:
    """Flushes and closes the files and the progress bar; later calls do nothing."""
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    if self._bar_sink is not None:
      self._bar_sink.close()
      self._bar_sink = None
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    self._active = self._console = False

  def __enter__(self) -> Self:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()


def training_flops_per_token(
    *,
    num_params: int,
    num_layers: int,
    num_heads: int,
    head_dim: int,
    seq_len: int,
    num_embedding_params: int = 0,
) -> float:
  """Model FLOPs to train on one token (forward + backward) of a decoder-only Transformer with causal attention.

  The convention is MaxText's `calculate_tflops_training_per_device` (MaxText/maxtext_utils.py, after the
  PaLM paper, arXiv:2204.02311 Appendix B), per token instead of per device step:

    weights:   each parameter used in a matmul costs 2 FLOPs (multiply + add) forward and 4 backward
               (gradients for the activations and for the weight): 6 * N.
    attention: per layer and token, Q K^T costs 2 * S * H * D and (attention weights) V another
               2 * S * H * D, so 4 * S * H * D forward without a mask; x3 for forward + backward gives
               12 * S * H * D; a causal mask halves it: 6 * S * H * D, so 6 * L * S * H * D in all.

  N = num_params - num_embedding_params: pass the model's total parameter count as `num_params` and, as
  `num_embedding_params`, the size of the input token-embedding table when the output head is untied (the
  table is then only a lookup, no matmul; the separate head matrix is a matmul and stays in N). With a tied
  head pass 0: the one table serves the output-head matmul, so it counts once. Norm scales stay in N; they
  are a negligible fraction.

  Args:
    num_params: total parameter count of the model being trained.
    num_layers: decoder layers L.
    num_heads: query heads H (with grouped-query attention, still the query heads).
    head_dim: per-head dimension D.
    seq_len: sequence length S the model attends over. As in MaxText, every layer counts the full S, also
      for packed sequences and sliding-window layers, where the real attention work is smaller.
    num_embedding_params: parameters used only by the embedding lookup (see above).
  """
  matmul_params = num_params - num_embedding_params
  attention = 6 * num_layers * seq_len * num_heads * head_dim
  return float(6 * matmul_params + attention)


# Peak dense (no sparsity) bf16 FLOP/s per JAX device. Vendor sources:
#   NVIDIA data sheets list bf16 Tensor Core FLOPs "with sparsity"; dense is half of that:
#     A100 (SXM and PCIe): 312 TFLOPS  https://www.nvidia.com/en-us/data-center/a100/
#     H100 SXM: 989, H100 PCIe: 756, H100 NVL: 835  https://www.nvidia.com/en-us/data-center/h100/
#     H200 SXM: 989, H200 NVL: 835  https://www.nvidia.com/en-us/data-center/h200/
#     GH200: 989 (its GPU is an H100)  https://www.nvidia.com/en-us/data-center/grace-hopper-superchip/
#     B200: 2250 (HGX B200)  https://www.nvidia.com/en-us/data-center/hgx/
#     GB200: 2500 (GB200 NVL72, 360 PFLOPS sparse over 72 GPUs)  https://www.nvidia.com/en-us/data-center/gb200-nvl72/
#   Google Cloud TPU system architecture pages list bf16 peak per chip, and JAX has one device per chip:
#     v4: 275, v5e: 197, v5p: 459, v6e (Trillium): 918  https://cloud.google.com/tpu/docs/system-architecture-tpu-vm
# Matched against the lower-cased `device.device_kind`; GPU kinds carry memory and form factor
# ("NVIDIA H100 80GB HBM3"), so they match by substring, the more specific names first.
_GPU_PEAKS = (
    ("gb200", 2500e12),
    ("b200", 2250e12),
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h200 nvl", 835e12),
    ("h100", 989e12),
    ("h200", 989e12),
    ("a100", 312e12),
)
# TPU kinds are exact ("TPU v5 lite" is v5e, "TPU v5" is v5p); exact matching keeps e.g. "TPU v4 lite" unknown.
_TPU_PEAKS = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5": 459e12,
    "tpu v5p": 459e12,
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
}


def device_peak_flops(device: Any) -> float | None:
  """Peak dense bf16 FLOP/s of one JAX device, or None for CPUs and kinds not in the table."""
  if getattr(device, "platform", "") == "cpu":
    return None
  kind = str(getattr(device, "device_kind", "")).lower().strip()
  if kind in _TPU_PEAKS:
    return _TPU_PEAKS[kind]
  for name, peak in _GPU_PEAKS:
    if name in kind:
      return peak
  return None


def mfu(tokens_per_sec_per_device: float, flops_per_token: float, peak: float | None) -> float | None:
  """Model FLOPs utilisation as a fraction of `peak` (0.4 = 40%); None when the peak is unknown."""
  if peak is None:
    return None
  return tokens_per_sec_per_device * flops_per_token / peak
