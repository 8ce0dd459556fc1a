"""The decoder and how it is built: abstractly (shapes + shardings), then directly into its shardings."""

import math

import jax
from flax import nnx
from jax.sharding import Mesh

from tunix_core.models.transformer import ModelConfig, Transformer

__all__ = ["ModelConfig", "Transformer", "abstract_model", "param_shardings", "init_params", "num_params"]


def abstract_model(cfg: ModelConfig, module: type[nnx.Module] = Transformer) -> tuple[nnx.GraphDef, nnx.State]:
  """The model's graph and its parameter state as shapes with logical-axis metadata (no memory used); `module` is
  the Transformer, or a module built around it (value_head.ValueModel)."""
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: module(cfg, rngs=nnx.Rngs(0)))
  return nnx.split(model)


def param_shardings(abstract_state: nnx.State, mesh: Mesh) -> dict:
  """NamedSharding per parameter (a pure dict like the params), by the active logical_axis_rules."""
  return nnx.to_pure_dict(nnx.get_named_sharding(abstract_state, mesh))


def init_params(cfg: ModelConfig, seed: int, shardings: dict) -> dict:
  """Freshly initialised parameters, each created on its devices in its sharding (never whole on a host)."""
  def init() -> dict:
    with nnx.use_eager_sharding(False):
      model = Transformer(cfg, rngs=nnx.Rngs(seed))
    return nnx.to_pure_dict(nnx.state(model))
  return jax.jit(init, out_shardings=shardings)()


def num_params(params) -> int:
  """Number of parameters of a params tree (arrays or shape structs)."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
