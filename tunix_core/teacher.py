"""mode=distill's extra models: the frozen teacher and the trainable feature-projection maps.

The teacher is THE decoder with its own ModelConfig (teacher_architecture, resolved by config.py from
teacher_model_name / teacher_load_parameters_path's run / teacher_hf_path) in teacher_dtype, its parameters
sharded by the same logical-axis rules as the student's, loaded from an orbax checkpoint of ours
(checkpoint.load_parameters) or Hugging Face safetensors (hf_weights.load) directly into those shardings. It lives
in the train state's `frozen` dict: the step reads it and never differentiates or updates it.
"""

import dataclasses
import types
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from tunix_core import checkpoint, models
from tunix_core.models import hf_weights


class Teacher(NamedTuple):
  model_config: models.ModelConfig
  graphdef: nnx.GraphDef
  abstract_params: Any
  param_shardings: Any

  def load(self, config) -> dict:
    """The teacher's weights in their shardings and dtype."""
    if config.teacher_load_parameters_path:
      return checkpoint.load_parameters(config.teacher_load_parameters_path, checkpoint.abstract_with_shardings(
          self.abstract_params, self.param_shardings), key="teacher_load_parameters_path")
    return hf_weights.load(config.teacher_hf_path, self.model_config, self.abstract_params, self.param_shardings)


def model_config(config, attention: str) -> models.ModelConfig:
  """The teacher's ModelConfig: its architecture keys over the run's, in teacher_dtype, never rematerialised
  (nothing of it is differentiated)."""
  values = {key: config[key] for key in config.keys()}
  values.update(config.teacher_architecture, dtype=config.teacher_dtype, weight_dtype=config.teacher_dtype,
                remat_policy="none", attention=attention)
  return models.ModelConfig.from_config(types.SimpleNamespace(**values))


def build(config, mesh: Mesh, attention: str) -> Teacher:
  """The teacher's graph, abstract parameters and shardings; call under the run's mesh and logical rules."""
  cfg = model_config(config, attention)
  graphdef, abstract_state = models.abstract_model(cfg)
  return Teacher(model_config=cfg, graphdef=graphdef, abstract_params=nnx.to_pure_dict(abstract_state),
                 param_shardings=models.param_shardings(abstract_state, mesh))


class _Projection(nnx.Module):
  """feature_projection's maps: one [student width, teacher width] matrix per layer pair."""

  def __init__(self, pairs: int, student_width: int, teacher_width: int, dtype, *, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
    self.kernel = nnx.Param(nnx.with_partitioning(init, (None, "embed", None))(
        rngs.params(), (pairs, student_width, teacher_width), dtype))


@dataclasses.dataclass(frozen=True)
class Projection:
  """The projection's shape; `abstract_and_shardings` and `init` under the run's mesh and logical rules."""
  pairs: int
  student_width: int
  teacher_width: int
  dtype: Any

  def _module(self, seed: int) -> _Projection:
    return _Projection(self.pairs, self.student_width, self.teacher_width, self.dtype, rngs=nnx.Rngs(seed))

  def abstract_and_shardings(self, mesh: Mesh) -> tuple[dict, dict]:
    with nnx.use_eager_sharding(False):
      abstract = nnx.state(nnx.eval_shape(lambda: self._module(0)))
    return nnx.to_pure_dict(abstract), nnx.to_pure_dict(nnx.get_named_sharding(abstract, mesh))

  def init(self, seed: int, shardings: dict) -> dict:
    def make() -> dict:
      with nnx.use_eager_sharding(False):
        return nnx.to_pure_dict(nnx.state(self._module(seed)))
    return jax.jit(make, out_shardings=shardings)()


def projection(config, student: models.ModelConfig, teacher: Teacher, pairs: int) -> Projection:
  return Projection(pairs=pairs, student_width=student.emb_dim, teacher_width=teacher.model_config.emb_dim,
                    dtype=jnp.dtype(config.weight_dtype))
