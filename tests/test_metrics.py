"""Tests for tunix_core.metrics: JSONL/TensorBoard/console writing and the MFU helpers."""

import glob
import io
import json
import math
import os
import struct
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from tunix_core import metrics
from tunix_core.errors import UserError


def _read_jsonl(path):
  def reject(constant):
    raise AssertionError(f"non-standard JSON constant {constant}")

  with open(path, encoding="utf-8") as f:
    return [json.loads(line, parse_constant=reject) for line in f]


def _read_events(logdir):
  """Scalar (tag, step, value) triples from every event file under `logdir`.

  No TensorBoard reader is installed, so this reads the TFRecord framing directly: a little-endian uint64
  length, its 4-byte masked CRC, the serialized Event, and the data's 4-byte masked CRC.
  """
  scalars = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      offset += 12
      event = event_pb2.Event.FromString(data[offset:offset + length])
      offset += length + 4
      for value in event.summary.value:
        scalars.append((value.tag, event.step, value.simple_value))
  return scalars


def test_jsonl_one_object_per_write_readable_before_close(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path), enable_tensorboard=False, total_steps=10, console=False)
  writer.write(1, {"loss": 2.5, "tokens": 128})
  writer.write(2, {"loss": np.float32(2.25), "tokens": np.int64(256), "lr": jnp.asarray(1e-3)})
  records = _read_jsonl(tmp_path / "metrics.jsonl")  # the writer is still open
  assert records == [
      {"step": 1, "loss": 2.5, "tokens": 128},
      {"step": 2, "loss": 2.25, "tokens": 256, "lr": pytest.approx(1e-3)},
  ]
  assert type(records[1]["tokens"]) is int and type(records[1]["lr"]) is float
  writer.close()
  writer.close()  # closing twice is harmless


def test_resumed_run_appends(tmp_path):
  with metrics.MetricsWriter(str(tmp_path), enable_tensorboard=False, total_steps=10, console=False) as writer:
    writer.write(1, {"loss": 3.0})
    writer.write(2, {"loss": 2.0})
  with metrics.MetricsWriter(str(tmp_path), enable_tensorboard=False, total_steps=10, console=False) as writer:
    writer.write(3, {"loss": 1.0})
  assert [r["step"] for r in _read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_partial_last_line_is_kept_and_not_joined(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo')
  with metrics.MetricsWriter(str(tmp_path), enable_tensorboard=False, total_steps=10, console=False) as writer:
    writer.write(3, {"loss": 1.0})
  lines = path.read_text().splitlines()
  assert lines == ['{"step": 1, "loss": 3.0}', '{"step": 2, "lo', '{"step": 3, "loss": 1.0}']


def test_nan_and_inf_are_null_in_jsonl_and_kept_in_tensorboard(tmp_path):
  with metrics.MetricsWriter(str(tmp_path), enable_tensorboard=True, total_steps=10, console=False) as writer:
    writer.write(1, {"loss": float("nan"), "grad_norm": np.float32("inf"), "ok": 1.5})
  assert _read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": None, "grad_norm": None, "ok": 1.5}]
  scalars = {tag: value for tag, _, value in _read_events(tmp_path / "tensorboard")}
  assert math.isnan(scalars["loss"]) and scalars["grad_norm"] == math.inf and scalars["ok"] == 1.5


def test_tensorboard_event_file_has_the_tags(tmp_path):
  with metrics.MetricsWriter(str(tmp_path), enable_tensorboard=True, total_steps=10, console=False) as writer:
    writer.write(5, {"loss": 2.0, "eval/loss": 2.5, "data/truncated": 3})
    writer.write(10, {"loss": 1.0})
  assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  assert sorted(_read_events(tmp_path / "tensorboard")) == [
      ("data/truncated", 5, 3.0),
      ("eval/loss", 5, 2.5),
      ("loss", 5, 2.0),
      ("loss", 10, 1.0),
  ]


def test_no_tensorboard_dir_when_disabled(tmp_path):
  with metrics.MetricsWriter(str(tmp_path), enable_tensorboard=False, total_steps=10, console=False) as writer:
    writer.write(1, {"loss": 1.0})
  assert not (tmp_path / "tensorboard").exists()


def test_non_primary_writes_and_prints_nothing(tmp_path, capsys):
  run_dir = tmp_path / "run"
  with metrics.MetricsWriter(str(run_dir), enable_tensorboard=True, total_steps=10, is_primary=False) as writer:
    writer.write(1, {"loss": 1.0})
    writer.advance(2)
  assert not run_dir.exists()
  assert capsys.readouterr().out == ""


def test_console_without_tty_prints_one_plain_line_per_write(tmp_path, capsys):
  with metrics.MetricsWriter(str(tmp_path), enable_tensorboard=False, total_steps=100) as writer:
    writer.write(10, {"loss": 2.5, "tokens_per_sec": 12345.6, "mfu": 0.4123, "other": 1.0})
    writer.advance(15)  # no line without a write
    writer.write(20, {"loss": 2.25})
  out = capsys.readouterr().out
  lines = out.splitlines()
  assert len(lines) == 2 and "\r" not in out
  assert "10/100" in lines[0] and "loss=2.5" in lines[0] and "tok/s=12,346" in lines[0] and "mfu=41.2%" in lines[0]
  assert "other" not in lines[0]
  assert "20/100" in lines[1] and "loss=2.25" in lines[1] and "tok/s=12,346" in lines[1]


def test_console_on_a_tty_draws_a_progress_bar(tmp_path, monkeypatch):
  class Terminal(io.StringIO):
    def isatty(self):
      return True

  terminal = Terminal()
  monkeypatch.setattr("sys.stdout", terminal)
  with metrics.MetricsWriter(str(tmp_path), enable_tensorboard=False, total_steps=100) as writer:
    writer.write(10, {"loss": 2.5})
    writer.advance(50)
  output = terminal.getvalue()
  assert "\r" in output and "50/100" in output and "loss=2.5" in output


def test_rejects_step_key_non_scalars_and_remote_dirs(tmp_path):
  with metrics.MetricsWriter(str(tmp_path), enable_tensorboard=False, total_steps=10, console=False) as writer:
    with pytest.raises(ValueError, match="'step'"):
      writer.write(1, {"step": 1.0})
    with pytest.raises(ValueError, match="'loss'"):
      writer.write(1, {"loss": np.zeros(2)})
  with pytest.raises(UserError, match="gs://bucket/run"):
    metrics.MetricsWriter("gs://bucket/run", enable_tensorboard=False, total_steps=10)


def test_training_flops_per_token_matches_hand_count():
  # Tiny model: 1000 parameters of which 200 are an untied input-embedding table, L=2, H=4, D=8, S=16.
  #   weights: 6 * (1000 - 200) = 4800
  #   attention per layer and token, forward, no mask: QK^T 2*16*4*8 = 1024, AV 1024 -> 2048;
  #   forward + backward: 3 * 2048 = 6144; causal: 3072; two layers: 6144.
  #   total: 4800 + 6144 = 10944
  flops = metrics.training_flops_per_token(
      num_params=1000, num_layers=2, num_heads=4, head_dim=8, seq_len=16, num_embedding_params=200
  )
  assert flops == 10944.0
  # Tied head: the table is the output-head matmul, so nothing is subtracted: 6 * 1000 + 6144 = 12144.
  assert metrics.training_flops_per_token(num_params=1000, num_layers=2, num_heads=4, head_dim=8, seq_len=16) == 12144.0


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
        ("NVIDIA B200", 2250e12),
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5", 459e12),
        ("TPU v5p", 459e12),
        ("TPU v6 lite", 918e12),
        ("TPU v4 lite", None),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_device_peak_flops(kind, peak):
  device = types.SimpleNamespace(platform="tpu" if kind.startswith("TPU") else "gpu", device_kind=kind)
  assert metrics.device_peak_flops(device) == peak


def test_device_peak_flops_is_none_on_cpu():
  assert metrics.device_peak_flops(jax.devices("cpu")[0]) is None


def test_mfu():
  # 1000 tokens/s * 1e12 FLOPs/token = 1e15 FLOP/s, against a 4e15 peak: 25%.
  assert metrics.mfu(1000.0, 1e12, 4e15) == pytest.approx(0.25)
  assert metrics.mfu(1000.0, 1e12, None) is None
