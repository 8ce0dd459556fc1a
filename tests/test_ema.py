"""ema_decay: the moving average of the trained weights, checked against a float64 recursion over the weights each
step saved; it is what evals and later runs use, and it survives a resume."""

import json
import types

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tunix_core import checkpoint, config as config_lib, train
from tunix_core.data import pipeline, tokenizer as tokenizer_lib

QUICK = ["per_device_batch_size=1", "max_target_length=64", "log_period=1", "sample_max_new_tokens=0",
         "enable_tensorboard=false"]
DECAY = 0.75


def _saved(run_dir, step: int, item: str) -> dict:
  return jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(run_dir / "checkpoints" / str(step) / item))


def _recursion(start: dict, steps: list[dict]) -> dict:
  """e_0 = the starting weights, e_k = d e_(k-1) + (1 - d) w_k, in float64."""
  ema = jax.tree.map(lambda x: np.asarray(x, np.float64), start)
  for weights in steps:
    ema = jax.tree.map(lambda e, w: DECAY * e + (1 - DECAY) * np.asarray(w, np.float64), ema, weights)
  return ema


def test_ema_follows_the_weights_evals_use_it_and_a_resume_keeps_it(tmp_path):
  args = ["configs/base.yml", *QUICK, f"base_output_directory={tmp_path}", "run_name=ema", f"ema_decay={DECAY}",
          "eval_interval=4", "eval_steps=1", "checkpoint_period=1", "max_num_checkpoints_to_keep=10",
          "learning_rate=1e-2", "warmup_steps_fraction=0"]
  train.run([*args, "steps=4"])
  train.run([*args, "steps=6"])  # resumes from step 4
  run_dir = tmp_path / "ema"
  config = config_lib.load([*args, "steps=6"], initialize_distributed=False)
  setup = train.build(config)
  with setup.activate():
    start = jax.device_get(setup.initial_state(config, None, None)["params"])  # the seeded init
  weights = [_saved(run_dir, step, "params") for step in range(1, 7)]
  for step in (4, 6):
    expected = _recursion(start, weights[:step])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), _saved(run_dir, step, "ema"),
                 expected)
  ema = _saved(run_dir, 6, "ema")
  assert not np.allclose(ema["embedding"], weights[-1]["embedding"])

  # The eval loss logged at step 6 is the moving average's, not the trained weights'.
  logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  eval_loss = [r["eval/loss"] for r in logged if r["step"] == 6 and "eval/loss" in r][-1]
  batches = pipeline.make_eval_batches(config, tokenizer_lib.load_tokenizer(config.tokenizer_path))
  with setup.activate():
    device_batches = [train.to_device_batch(b, config, setup.eval_batch_sharding, accumulate=False)
                      for b in batches]
    of = lambda params: train.evaluate(setup.eval_step, {"params": params, "frozen": {}}, device_batches)["eval/loss"]
    assert eval_loss == pytest.approx(of(ema), rel=1e-5)
    assert of(weights[-1]) != pytest.approx(eval_loss, rel=1e-4)

  # Another run that loads this one starts from the moving average.
  loaded_config = config_lib.load(["configs/base.yml", *QUICK, f"load_parameters_path={run_dir}"],
                                  initialize_distributed=False)
  loaded_setup = train.build(loaded_config)
  with loaded_setup.activate():
    loaded = jax.device_get(loaded_setup.initial_state(loaded_config, None, None)["params"])
  jax.tree.map(np.testing.assert_array_equal, loaded, ema)


def test_a_resume_that_turns_ema_on_starts_it_from_the_restored_weights(tmp_path):
  """The checkpoint of a run without the average has no ema item; restoring into a state that keeps one copies
  the restored params (and a run that keeps one saves and restores its own)."""
  config = types.SimpleNamespace(checkpoint_dir=str(tmp_path), max_num_checkpoints_to_keep=3,
                                 async_checkpointing=False)
  params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
  state = {"params": params, "opt_state": {"m": np.ones(3, np.float32)}, "step": np.int32(2)}
  iterator = lambda: iter(grain.MapDataset.range(8).to_iter_dataset())
  checkpointer = checkpoint.Checkpointer(config)
  checkpointer.save(2, state, iterator(), {"step": 2})
  checkpointer.save(3, {**state, "ema": {"w": params["w"] + 0.5}}, iterator(), {"step": 3})
  checkpointer.wait()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), {**state, "ema": params})
  without, with_ema = checkpointer.restore(2, abstract, iterator()), checkpointer.restore(3, abstract, iterator())
  checkpointer.close()
  np.testing.assert_array_equal(without["ema"]["w"], params["w"])
  np.testing.assert_array_equal(with_ema["ema"]["w"], params["w"] + 0.5)
  assert checkpoint.resolve_parameters_path(str(tmp_path / "2")).endswith("2/params")
  assert checkpoint.resolve_parameters_path(str(tmp_path)).endswith("3/ema")
