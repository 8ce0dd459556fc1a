"""`python3 -m tunix_core.generate`: completions alone on stdout, JSONL for a prompts file, seeded, one-line errors."""

import json
import subprocess
import sys

import pytest

from tunix_core.generate.__main__ import main

# A one-layer version of the default model with seeded random weights: fast, and nothing to download.
SMALL = ["configs/base.yml", "base_num_decoder_layers=1", "max_new_tokens=6", "prefill_length_buckets=[32]",
         "generate_batch_size=4"]


def run_in_process(capsys, *args: str) -> tuple[int, str, str]:
  code = main([*SMALL, *args])
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def test_stdout_holds_only_the_completions_and_a_seed_repeats_them(capsys):
  args = ["prompt=Jack has 5 stamps", "chat=true", "temperature=0.8", "seed=3", "num_samples=2"]
  code, out, err = run_in_process(capsys, *args)
  assert code == 0 and "weights: init seed=3" in err
  # Another process, same seed: byte for byte the same stdout, and nothing else on it.
  proc = subprocess.run([sys.executable, "-m", "tunix_core.generate", *SMALL, *args], capture_output=True,
                        check=False)
  assert proc.returncode == 0, proc.stderr.decode()[-2000:]
  assert proc.stdout.decode() == out and out.count("\n") >= 2


def test_prompts_file_gives_jsonl(tmp_path, capsys):
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text(json.dumps({"prompt": "Ann has 3 apples."}) + "\n\n" +
                     json.dumps({"messages": [{"role": "user", "content": "How many?"}]}) + "\n")
  code, out, _ = run_in_process(capsys, f"prompts_file={prompts}", "beam_width=2", "num_samples=2")
  assert code == 0
  rows = [json.loads(line) for line in out.splitlines()]
  assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
  for r in rows:
    assert r["length"] == len(r["token_ids"]) == len(r["logprobs"]) <= 6
    assert r["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("args,message", [
    ([], "give prompt="),
    (["prompts_file=/nonexistent.jsonl"], "no such file"),
    (["prompt=hi", "top_p=1.5"], "top_p=1.5"),
    (["prompt=hi", "beam_width=2", "num_samples=3"], "num_samples=3 > beam_width=2"),
    (["prompt=hi", "temperature=-1"], "temperature=-1"),
])
def test_mistakes_are_one_line_and_exit_2(capsys, args, message):
  code, out, err = run_in_process(capsys, *args)
  assert code == 2 and out == ""
  assert err.count("\n") == 1 and err.startswith("tunix_core.generate: error:") and message in err


def test_bad_prompts_file_line(tmp_path, capsys):
  prompts = tmp_path / "bad.jsonl"
  prompts.write_text('{"prompt": "ok"}\n{not json\n')
  code, _, err = run_in_process(capsys, f"prompts_file={prompts}")
  assert code == 2 and "line 2: not valid JSON" in err
