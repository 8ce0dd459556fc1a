"""A trained reward model (a mode=rm run) loaded back for scoring: PPO's learned reward, or an evaluation.

  model = reward_model.load("runs/rm_default")          # a run directory or one of its checkpoints/<step>
  model.score(prompts, completions)                     # -> float32 numpy [n]; texts or chat messages
  model.score_tokens(tokens, segment_ids)               # -> float32 [B] on device; token rows, e.g. rollouts

A reward is the value head's output at a sequence's last token. `score` encodes sequences exactly as mode=rm's
training did ([BOS] prompt completion [EOS] with add_bos/add_eos, or the chat template); token rows given to
`score_tokens` should look the same, e.g. a prompt's ids followed by the sampler's completion ids, which keep the EOS.
"""

import functools
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import yaml
from flax import nnx
from jax.sharding import Mesh

from tunix_core import checkpoint, config as config_lib, export, models, sharding
from tunix_core.data import preference, tokenizer as tokenizer_lib
from tunix_core.errors import UserError
from tunix_core.models.value_head import ValueModel


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _rewards(graphdef: nnx.GraphDef, params, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array
             ) -> jax.Array:
  return nnx.merge(graphdef, params).sequence_values(tokens, positions, segment_ids)


class RewardModel:
  """A reward model's weights on a mesh, with the config and tokenizer it was trained with."""

  def __init__(self, config: ml_collections.FrozenConfigDict, graphdef: nnx.GraphDef, params: dict, mesh: Mesh,
               rules: tuple):
    self.config, self.graphdef, self.params, self.mesh, self.rules = config, graphdef, params, mesh, rules
    self.tokenizer = tokenizer_lib.load_tokenizer(config.tokenizer_path)
    self._row_sharding = sharding.batch_sharding(mesh, rules)

  def score_tokens(self, tokens: jax.Array, segment_ids: jax.Array, positions: jax.Array | None = None
                   ) -> jax.Array:
    """Rewards, float32 [B], of token rows [B, L]: one sequence per row, padding (either side) where segment_ids is
    0. positions default to 0, 1, ... from each row's first real token. Jitted; call it under any mesh."""
    real = segment_ids > 0
    if positions is None:
      positions = jnp.maximum(jnp.cumsum(real, axis=-1) - 1, 0).astype(jnp.int32)
    with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
      return _rewards(self.graphdef, self.params, tokens, positions, real.astype(jnp.int32))

  def score(self, prompts: list, completions: list, batch_size: int = 0) -> np.ndarray:
    """Rewards, float32 [n], of (prompt, completion) pairs of text (or chat messages), in batches of batch_size rows
    (default: the run's micro-batch), each padded to full size so that one compile serves every batch."""
    rows = preference.sequence_rows(self.config, self.tokenizer, prompts, completions)
    shards = self._batch_shards()
    batch_size = -(-(batch_size or self.config.micro_batch_size) // shards) * shards
    total = len(prompts)
    padded = -(-total // batch_size) * batch_size
    rows = {key: np.pad(value, ((0, padded - total), (0, 0))) for key, value in rows.items()}
    out = []
    for start in range(0, padded, batch_size):
      batch = {key: self._place(rows[key][start:start + batch_size]) for key in ("inputs", "positions", "segment_ids")}
      out.append(self.score_tokens(batch["inputs"], batch["segment_ids"], batch["positions"]))
    return np.concatenate(jax.device_get(out))[:total].astype(np.float32)

  def _batch_shards(self) -> int:
    axes = self._row_sharding.spec[0] or ()
    return math.prod(self.mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))

  def _place(self, array: np.ndarray) -> jax.Array:
    """A global array from the same host array on every process."""
    return jax.make_array_from_callback(array.shape, self._row_sharding, lambda index: array[index])


def load(path: str, mesh: Mesh | None = None, rules: tuple | None = None) -> RewardModel:
  """The reward model of a mode=rm run directory (its latest checkpoint) or of one checkpoints/<step> directory, its
  weights placed on `mesh` by `rules` (defaults: the run's own parallelism over this machine's devices, and the run's
  logical_axis_rules)."""
  run_dir, params_item = export.find_run(path)
  with open(os.path.join(run_dir, "config.yml")) as f:
    config = config_lib.load_saved(yaml.safe_load(f))
  if config.mode != "rm":
    raise UserError(f"{path}: a mode={config.mode} run, not a reward model; train one with mode=rm")
  mesh = mesh or sharding.build_mesh(config)
  rules = rules or sharding.logical_rules(config)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    graphdef, abstract_state = models.abstract_model(models.ModelConfig.from_config(config), ValueModel)
    shardings = models.param_shardings(abstract_state, mesh)
    params = checkpoint.load_parameters(
        params_item, checkpoint.abstract_with_shardings(nnx.to_pure_dict(abstract_state), shardings))
  return RewardModel(config, graphdef, params, mesh, rules)
