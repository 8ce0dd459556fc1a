"""Orbax checkpoints: params, optimizer state, step and the data iterator's position, saved async.

Layout: <run_dir>/checkpoints/<step>/{params, optimizer, data, meta}, and ema (the weights' moving average) when
the run keeps one: a run's model is its ema where it has one, else its params. Orbax writes each step into a
temporary directory and renames it when complete, so a run killed mid-save leaves the previous
checkpoints intact and the half-written one is ignored.
"""

import os
from typing import Any

from etils import epath
import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from tunix_core.errors import UserError

ITEMS = ("params", "optimizer", "data", "meta", "ema")
# Trainable entries a run may save next to the model's params that are not part of the model (mode=distill's
# feature_projection maps): loading a model from such a checkpoint leaves them out.
TRAINING_ONLY_KEYS = ("distill_projection",)


class Checkpointer:
  """Saves and restores a run's train state and data iterator under config.checkpoint_dir."""

  def __init__(self, config):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.max_num_checkpoints_to_keep,
        enable_async_checkpointing=config.async_checkpointing,
        create=True)
    self._directory = os.path.abspath(config.checkpoint_dir)
    self._manager = ocp.CheckpointManager(self._directory, options=options, item_names=ITEMS)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: dict[str, Any], data_iterator: grain.DatasetIterator, meta: dict) -> None:
    """Starts saving (returns before the write finishes when async); waits for any earlier save first."""
    items = {"params": ocp.args.StandardSave(state["params"]),
             "optimizer": ocp.args.StandardSave({"opt_state": state["opt_state"], "step": state["step"]}),
             "data": grain.checkpoint.CheckpointSave(data_iterator), "meta": ocp.args.JsonSave(meta)}
    if "ema" in state:
      items["ema"] = ocp.args.StandardSave(state["ema"])
    self._manager.save(step, args=ocp.args.Composite(**items))

  def restore(self, step: int, abstract_state: dict[str, Any], data_iterator: grain.DatasetIterator
              ) -> dict[str, Any]:
    """Restores the state into `abstract_state`'s shapes and shardings and moves the iterator in place. A moving
    average that the step did not save (ema_decay turned on at resume) starts from the restored params."""
    items = {"params": ocp.args.StandardRestore(abstract_state["params"]),
             "optimizer": ocp.args.StandardRestore(
                 {"opt_state": abstract_state["opt_state"], "step": abstract_state["step"]}),
             "data": grain.checkpoint.CheckpointRestore(data_iterator)}
    saved_ema = os.path.isdir(os.path.join(self._directory, str(step), "ema"))
    if "ema" in abstract_state and saved_ema:
      items["ema"] = ocp.args.StandardRestore(abstract_state["ema"])
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    state = {"params": restored.params, **restored.optimizer}
    if "ema" in abstract_state:
      state["ema"] = restored.ema if saved_ema else jax.tree.map(jnp.copy, restored.params)
    return state

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def resolve_parameters_path(path: str, key: str = "load_parameters_path") -> str:
  """A run directory (its latest step), its checkpoints/ directory, one step's directory or that step's
  params/ or ema/ -> the model's item: the step's ema (moving average) where it has one, else its params."""
  path = os.path.abspath(path)
  if os.path.basename(path) in ("params", "ema") and os.path.isdir(path) and not os.path.isdir(
      os.path.join(path, "checkpoints")):  # an item, not a run directory of that name
    return path
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  if not os.path.isdir(os.path.join(path, "params")):
    steps = [int(name) for name in os.listdir(path) if name.isdigit()] if os.path.isdir(path) else []
    if not steps:
      raise UserError(f"{key}={path}: no checkpoint found; expected a run directory, its "
                      f"checkpoints/ directory or a step directory holding params/")
    path = os.path.join(path, str(max(steps)))
  return os.path.join(path, "ema" if os.path.isdir(os.path.join(path, "ema")) else "params")


def load_parameters(path: str, abstract_params: Any, key: str = "load_parameters_path") -> Any:
  """Reads only the params of another run's checkpoint into `abstract_params`' shapes and shardings (casting to
  their dtypes); `key` is the config key that named the path, for errors. Training-only entries saved next to the
  model's (TRAINING_ONLY_KEYS) are skipped."""
  item = resolve_parameters_path(path, key)
  try:
    saved = ocp.PyTreeCheckpointHandler().metadata(epath.Path(item))
    skipped = [k for k in TRAINING_ONLY_KEYS if k in saved and k not in abstract_params]
    if not skipped:
      return ocp.StandardCheckpointer().restore(item, abstract_params)
    return ocp.PyTreeCheckpointer().restore(item, args=ocp.args.PyTreeRestore(
        item=abstract_params, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_params),
        partial_restore=True))
  except (ValueError, KeyError) as e:
    raise UserError(f"{key}={path}: its params do not match this model ({str(e).splitlines()[0]}); "
                    f"use the same model settings as the run that wrote it") from None


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings: what orbax restores into."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
