"""Two JAX processes on localhost (4 CPU devices each) train exactly like one process with 8 devices."""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

from tunix_core import train
from test_train import read_metrics

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  # Without packing each example is one row, so both layouts see the same global batch row for row.
  args = [f"base_output_directory={tmp_path}", "steps=4", "per_device_batch_size=1", "max_target_length=64",
          "packing=false", "log_period=1", "eval_dataset_path=", "enable_checkpointing=false",
          "sample_max_new_tokens=3", "enable_tensorboard=false"]
  address = f"127.0.0.1:{_free_port()}"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  procs = [subprocess.Popen([sys.executable, "-m", "tunix_core.train", "configs/base.yml", *args, "run_name=two",
                             f"coordinator_address={address}", "num_processes=2", f"process_id={i}"],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  assert "8 device(s)" in outputs[0][0] and "sample completion:" in outputs[0][0]

  train.run(["configs/base.yml", *args, "run_name=one"])
  one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
  assert sorted(two) == [1, 2, 3, 4]
  for step in one:
    np.testing.assert_allclose(two[step]["loss"], one[step]["loss"], rtol=1e-6)
    np.testing.assert_allclose(two[step]["grad_norm"], one[step]["grad_norm"], rtol=1e-5)
    assert two[step]["loss_tokens"] == one[step]["loss_tokens"]
