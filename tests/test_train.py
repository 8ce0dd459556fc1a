"""The train loop end to end: a short default run, accumulation equivalence, no recompiles, exact resume."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml

from tunix_core import config as config_lib, train
from tunix_core.data import pipeline, tokenizer as tokenizer_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# Small, quick settings shared by the tests below (8 simulated devices: 8 rows per micro-batch).
QUICK = ["per_device_batch_size=1", "max_target_length=64", "log_period=1", "sample_max_new_tokens=0",
         "enable_tensorboard=false"]


def read_metrics(run_dir) -> dict[int, dict]:
  """The last record of each step (a resumed run repeats some steps), eval records kept apart."""
  by_step = {}
  for line in pathlib.Path(run_dir, "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if "loss" in record:
      by_step[record["step"]] = record
  return by_step


def test_default_run_end_to_end(tmp_path, capsys):
  summary = train.run(["configs/base.yml", f"base_output_directory={tmp_path}", "steps=8", "per_device_batch_size=1",
                       "log_period=2", "eval_interval=4", "eval_steps=1", "checkpoint_period=4",
                       "sample_max_new_tokens=6", "max_target_length=40"])
  run_dir = tmp_path / "default"
  records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  train_records = [r for r in records if "loss" in r]
  assert [r["step"] for r in train_records] == [1, 2, 4, 6, 8]  # the first step always, then every log_period
  assert {"loss", "learning_rate", "grad_norm", "tokens_per_sec", "step_time", "data/truncated"} <= set(
      train_records[0])
  assert train_records[-1]["loss"] < train_records[0]["loss"]
  assert train_records[0]["data/truncated"] > 0  # arithmetic examples run up to 63 tokens; rows hold 40
  assert [r["step"] for r in records if "eval/loss" in r] == [4, 8]
  assert sorted(os.listdir(run_dir / "checkpoints")) == ["4", "8"]
  assert list((run_dir / "tensorboard").iterdir())
  assert yaml.safe_load((run_dir / "config.yml").read_text())["steps"] == 8
  out = capsys.readouterr().out
  assert f"checkpoints:   {run_dir}/checkpoints" in out and "sample completion:" in out
  assert isinstance(summary["sample"]["completion"], str)


def _one_step(overrides, batch) -> tuple[dict, float]:
  """Runs one train step from the seed-0 initial params on `batch` ([rows, length] numpy)."""
  config = config_lib.load(["configs/base.yml", *overrides], initialize_distributed=False)
  setup = train.build(config)
  with setup.activate():
    state = setup.initial_state(config, None, None)
    device_batch = train.to_device_batch(batch, config, setup.train_batch_sharding, accumulate=True)
    state, metrics = setup.train_step(state, device_batch)
    return jax.device_get(state["params"]), float(metrics["loss"])


def test_gradient_accumulation_equals_one_large_batch():
  """4 micro-batches of 2 rows give the update of one batch of 8 rows (normalised by all loss tokens)."""
  # Plain SGD with lr 1 makes the parameter change the normalised gradient itself (Adam would rescale it).
  common = ["max_target_length=64", "ici_fsdp_parallelism=2", "ici_sequence_parallelism=4", "opt_type=sgd",
            "learning_rate=1.0", "warmup_steps_fraction=0", "gradient_clipping_threshold=0"]
  config = config_lib.load(["configs/base.yml", *common, "per_device_batch_size=1"], initialize_distributed=False)
  batch = next(pipeline.make_train_iterator(config, tokenizer_lib.load_tokenizer(config.tokenizer_path)))
  rows_loss = batch["loss_mask"].sum(axis=1)
  assert rows_loss.min() != rows_loss.max()  # unequal micro-batch token counts make the normalisation matter
  big_params, big_loss = _one_step([*common, "per_device_batch_size=1"], batch)
  acc_params, acc_loss = _one_step([*common, "per_device_batch_size=0.25", "gradient_accumulation_steps=4"], batch)
  assert acc_loss == pytest.approx(big_loss, rel=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), big_params, acc_params)


def test_no_recompilation_after_the_first_step(tmp_path):
  """A 2-step run and a 6-step run compile exactly the same programs."""
  compiles = []

  def listener(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    counts = []
    for steps in (2, 6):
      compiles.clear()
      train.run(["configs/base.yml", f"base_output_directory={tmp_path}", f"run_name=r{steps}", f"steps={steps}",
                 "eval_dataset_path=", "enable_checkpointing=false", *QUICK])
      counts.append(len(compiles))
  finally:
    jax.monitoring.clear_event_listeners()
  assert counts[0] == counts[1], counts


def _cli(*args, env=None, **kwargs) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "tunix_core.train", "configs/base.yml", *args], cwd=REPO_ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or os.environ.copy(),
                          **kwargs)


def test_killed_run_resumes_exactly(tmp_path):
  """SIGKILL mid-run, start the same command again: every step's loss equals an uninterrupted run's, bit for bit."""
  args = [f"base_output_directory={tmp_path}", "steps=24", "checkpoint_period=4", "eval_dataset_path=", *QUICK]
  train.run([*args, "run_name=whole"])

  proc = _cli(*args, "run_name=killed")
  checkpoints = tmp_path / "killed" / "checkpoints"
  deadline = time.time() + 240
  while not (checkpoints / "8").is_dir() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  killed_at = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  assert killed_at < 24

  resumed = _cli(*args, "run_name=killed")
  out, err = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, err
  assert f"from step {killed_at}" in out
  whole, killed = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "killed")
  assert sorted(killed) == list(range(1, 25))
  for step in range(1, 25):
    assert killed[step]["loss"] == whole[step]["loss"], step
    assert killed[step]["grad_norm"] == whole[step]["grad_norm"], step


def test_load_parameters_path_starts_from_another_run(tmp_path):
  first = train.run(["configs/base.yml", f"base_output_directory={tmp_path}", "run_name=a", "steps=3",
                     "eval_dataset_path=", *QUICK])
  assert first["steps"] == 3
  config = config_lib.load(["configs/base.yml", f"load_parameters_path={tmp_path}/a", *QUICK],
                           initialize_distributed=False)
  setup = train.build(config)
  with setup.activate():
    loaded = setup.initial_state(config, None, None)["params"]
  fresh_config = config_lib.load(["configs/base.yml", *QUICK], initialize_distributed=False)
  with setup.activate():
    fresh = train.build(fresh_config).initial_state(fresh_config, None, None)["params"]
  saved = ocp.StandardCheckpointer().restore(tmp_path / "a" / "checkpoints" / "3" / "params")
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), saved)
  assert not np.array_equal(jax.device_get(fresh)["embedding"], saved["embedding"])


def test_same_run_on_one_device_and_on_three_meshes_of_eight(tmp_path):
  """fsdp=8, data=2 x fsdp=2 x tensor=2, fsdp=2 x sequence=4 (projections on [B, S, E], not flattened rows) and
  a single device train the same 8-row batches to the same losses."""
  args = [f"base_output_directory={tmp_path}", "steps=3", "max_target_length=64", "log_period=1",
          "eval_dataset_path=", "enable_checkpointing=false", "sample_max_new_tokens=0", "enable_tensorboard=false"]
  train.run(["configs/base.yml", *args, "run_name=fsdp8", "per_device_batch_size=1"])
  train.run(["configs/base.yml", *args, "run_name=dft", "per_device_batch_size=1", "ici_data_parallelism=2",
             "ici_fsdp_parallelism=2", "ici_tensor_parallelism=2"])
  train.run(["configs/base.yml", *args, "run_name=seq", "per_device_batch_size=1", "ici_fsdp_parallelism=2",
             "ici_sequence_parallelism=4"])
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  single = _cli(*args, "run_name=single", "per_device_batch_size=8", env=env)
  _, err = single.communicate(timeout=300)
  assert single.returncode == 0, err
  runs = {name: read_metrics(tmp_path / name) for name in ("fsdp8", "dft", "seq", "single")}
  for step in (1, 2, 3):
    reference = runs["single"][step]["loss"]
    for name in ("fsdp8", "dft", "seq"):
      np.testing.assert_allclose(runs[name][step]["loss"], reference, rtol=2e-5, err_msg=f"{name} step {step}")
