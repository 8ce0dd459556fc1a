"""Meshes from parallelism settings, and where each parameter and batch lands under the rules."""

import json

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tunix_core import config as config_lib, models, sharding
from tunix_core.errors import UserError


def _config(*overrides):
  return config_lib.load(list(overrides), initialize_distributed=False)


@pytest.mark.parametrize("overrides, shape", [
    ((), {"data": 1, "fsdp": 8, "tensor": 1, "sequence": 1}),
    (("ici_data_parallelism=2", "ici_fsdp_parallelism=2", "ici_tensor_parallelism=2"),
     {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}),
    (("ici_fsdp_parallelism=2", "ici_sequence_parallelism=4"), {"data": 1, "fsdp": 2, "tensor": 1, "sequence": 4}),
])
def test_mesh_shapes(overrides, shape):
  assert dict(sharding.build_mesh(_config(*overrides)).shape) == shape


def _param_specs(cfg):
  mesh = sharding.build_mesh(cfg)
  rules = sharding.logical_rules(cfg)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    _, abstract = models.abstract_model(models.ModelConfig.from_config(cfg))
    shardings = models.param_shardings(abstract, mesh)
  return jax.tree.map(lambda s: s.spec, shardings), mesh, rules


def test_fsdp_rules_shard_embed_dimension():
  specs, mesh, _ = _param_specs(_config())
  assert mesh.shape["tensor"] == 1  # so the "tensor" entries below replicate
  assert specs["embedding"] == P("tensor", "fsdp")                             # (vocab, embed)
  assert specs["layers"]["attention"]["query"] == P(None, "fsdp", "tensor", None)  # (layers, embed, heads, head_dim)
  assert specs["layers"]["mlp"]["wo"] == P(None, "tensor", "fsdp")             # (layers, mlp, embed)
  assert specs["final_norm"]["scale"] == P(None)


def test_tensor_rules_shard_heads_mlp_and_vocab():
  cfg = _config("ici_data_parallelism=2", "ici_fsdp_parallelism=2", "ici_tensor_parallelism=2")
  specs, mesh, rules = _param_specs(cfg)
  assert specs["embedding"] == P("tensor", "fsdp")
  assert specs["layers"]["attention"]["key"] == P(None, "fsdp", "tensor", None)
  assert specs["layers"]["attention"]["out"] == P(None, "tensor", None, "fsdp")
  assert specs["layers"]["mlp"]["wi_0"] == P(None, "fsdp", "tensor")
  assert sharding.batch_sharding(mesh, rules, leading_axes=1).spec == P(None, ("data", "fsdp"), "sequence")


def test_custom_rules_change_placement_without_code():
  moved = {"embed": [], "mlp": ["fsdp"], "vocab": ["fsdp"], "heads": ["fsdp"], "kv_heads": []}
  base = config_lib.layer([])["logical_axis_rules"]
  rules = json.dumps([[name, moved.get(name, axes)] for name, axes in base])
  specs, _, _ = _param_specs(_config(f"logical_axis_rules={rules}"))
  assert specs["embedding"] == P("fsdp", None)
  assert specs["layers"]["mlp"]["wi_1"] == P(None, None, "fsdp")
  assert specs["layers"]["attention"]["query"] == P(None, None, "fsdp", None)


def test_params_are_created_in_their_shardings():
  cfg = _config("ici_data_parallelism=2", "ici_fsdp_parallelism=2", "ici_tensor_parallelism=2")
  mesh = sharding.build_mesh(cfg)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.logical_rules(cfg)):
    model_cfg = models.ModelConfig.from_config(cfg)
    _, abstract = models.abstract_model(model_cfg)
    shardings = models.param_shardings(abstract, mesh)
    params = models.init_params(model_cfg, 0, shardings)
  wi = params["layers"]["mlp"]["wi_0"]
  assert wi.sharding.spec == P(None, "fsdp", "tensor")
  # Each device holds a quarter of the matrix: fsdp=2 x tensor=2 (replicated over data=2).
  assert wi.addressable_shards[0].data.shape == (cfg.base_num_decoder_layers, cfg.base_emb_dim // 2,
                                                 cfg.base_mlp_dim // 2)


def test_a_missing_rule_is_named():
  base = config_lib.layer([])["logical_axis_rules"]
  rules = json.dumps([rule for rule in base if rule[0] != "norm"])
  with pytest.raises(UserError, match=r"no rule for norm"):
    _config(f"logical_axis_rules={rules}")
