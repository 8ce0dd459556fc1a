"""Every mistake a user can make ends in one line on stderr, exit code 2, no traceback, nothing damaged."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tunix_core import train

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _fail(capsys, *args) -> str:
  with pytest.raises(SystemExit) as exit_info:
    train.main(["train", "configs/base.yml", *args])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("tunix_core: error: "), err
  assert "Traceback" not in err
  return err


def _jsonl(path: pathlib.Path, lines: list[str]) -> str:
  path.write_text("\n".join(lines) + "\n")
  return str(path)


GOOD = json.dumps({"prompt": "1 + 1 = ", "completion": "2"})


@pytest.mark.parametrize("args, expected", [
    (["learning_rat=0.1"], "unknown config key 'learning_rat'"),
    (["steps=many"], "steps='many' (from command line): expected an integer"),
    (["dataset_path=no/such.jsonl"], "dataset_path=no/such.jsonl"),
    (["tokenizer_path=no/such.model"], "tokenizer_path=no/such.model"),
    (["per_device_batch_size=0.5"], "does not divide over 8 batch shards"),
    (["load_parameters_path=/no/such/run"], "load_parameters_path=/no/such/run: no checkpoint found"),
    (["ema_decay=1"], "ema_decay=1.0: must be at least 0 (0 = off) and below 1"),
    (["vocab_size=100"], "set vocab_size >= 512"),
])
def test_config_and_path_errors(capsys, tmp_path, args, expected):
  err = _fail(capsys, f"base_output_directory={tmp_path}", *args)
  assert expected in err, err


def test_malformed_jsonl_names_file_and_line(capsys, tmp_path):
  data = _jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, '{"prompt": "x", "completion": ', GOOD])
  err = _fail(capsys, f"dataset_path={data}", "eval_dataset_path=")
  assert "bad.jsonl" in err and "line 3" in err, err


def test_too_few_examples_for_one_batch(capsys, tmp_path):
  data = _jsonl(tmp_path / "small.jsonl", [GOOD] * 3)
  err = _fail(capsys, f"dataset_path={data}", "eval_dataset_path=", "per_device_batch_size=1")
  assert "3 examples" in err and "needs 8" in err, err


def test_errors_leave_existing_checkpoints_untouched(capsys, tmp_path):
  base = [f"base_output_directory={tmp_path}", "steps=2", "per_device_batch_size=1", "max_target_length=64",
          "eval_dataset_path=", "sample_max_new_tokens=0"]
  train.run(["configs/base.yml", *base])
  run_dir = tmp_path / "default"
  before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
  bad_data = _jsonl(tmp_path / "bad.jsonl", ["not json"])
  _fail(capsys, *base, "steps=4", f"dataset_path={bad_data}")
  _fail(capsys, *base, "steps=4", "learning_rate=fast")
  assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


def test_command_line_error_has_no_traceback():
  result = subprocess.run([sys.executable, "-m", "tunix_core.train", "configs/base.yml", "stpes=3"], cwd=REPO_ROOT,
                          capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("tunix_core: error: unknown config key 'stpes'"), result.stderr
