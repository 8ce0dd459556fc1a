"""LoRA / QLoRA (tunix_core.peft) on the default small model, sharded fsdp=8 over the 8 simulated devices."""

import contextlib
import dataclasses
import functools
import math
import types

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx, traverse_util

from tunix_core import config as config_lib, models, peft, sharding
from tunix_core.errors import UserError

ALL = ".*(attention|mlp).*"  # the config's default lora_targets
OVERRIDES = ["base_num_decoder_layers=2", "lora_rank=4", "lora_alpha=8.0"]


def _load(*overrides):
  return config_lib.load(["configs/base.yml", *OVERRIDES, *overrides], initialize_distributed=False)


class Env:
  """A config's mesh, rules and model; `build` makes the LoRA model, base params, frozen base and adapters."""

  def __init__(self, *overrides):
    self.config = _load(*overrides)
    self.mesh, self.rules = sharding.build_mesh(self.config), sharding.logical_rules(self.config)
    self.cfg = models.ModelConfig.from_config(self.config)

  @contextlib.contextmanager
  def activate(self):
    """The mesh and rules everything is built and run under (as train.Setup.activate)."""
    with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
      yield

  def build(self, **peft_changes):
    spec = dataclasses.replace(peft.PeftConfig.from_config(self.config), **peft_changes)
    lm = peft.lora_model(self.cfg, spec, self.mesh)
    params = models.init_params(self.cfg, 0, lm.param_shardings)
    return lm, params, peft.frozen_from_params(lm, params), peft.init_adapters(lm, 1)


TOKENS = (jnp.arange(64, dtype=jnp.int32).reshape(2, 32) * 7) % 512
POSITIONS = jnp.tile(jnp.arange(32, dtype=jnp.int32), (2, 1))
SEGMENTS = jnp.ones((2, 32), jnp.int32)


@functools.cache
def _plain_forward(cfg: models.ModelConfig):
  graphdef = models.abstract_model(cfg)[0]
  return jax.jit(lambda p: nnx.merge(graphdef, p)(TOKENS, POSITIONS, SEGMENTS))


_LORA_FORWARDS = {}


def _lora_logits(lm, frozen, trainable):
  """The LoRA model's logits; one jitted forward per LoRA graph (compiles dominate these tests)."""
  if id(lm.graphdef) not in _LORA_FORWARDS:
    _LORA_FORWARDS[id(lm.graphdef)] = (lm, jax.jit(lambda f, t: peft.model(lm, f, t)(TOKENS, POSITIONS, SEGMENTS)))
  return _LORA_FORWARDS[id(lm.graphdef)][1](frozen, trainable)


def _perturbed(lm, trainable):
  """The adapters plus a fixed pseudo-random pattern (std ~0.035), in their shardings: lora_b non-zero."""
  def perturb(trainable):
    leaves, treedef = jax.tree.flatten(trainable)
    return jax.tree.unflatten(treedef, [x + 0.05 * jnp.sin(jnp.arange(x.size, dtype=x.dtype) * 0.7 + i).reshape(x.shape)
                                        for i, x in enumerate(leaves)])
  return jax.jit(perturb, out_shardings=lm.trainable_shardings)(trainable)


def _adapters_off(lm, trainable):
  return jax.jit(peft.adapters_off, out_shardings=lm.trainable_shardings)(trainable)


@jax.jit
def _norms(a, b):
  return jnp.linalg.norm(a - b), jnp.linalg.norm(b), jnp.abs(a - b).max(), jnp.abs(b).max()


def _relative(a, b) -> float:
  """||a - b|| / ||b||."""
  diff, ref = _norms(a, b)[:2]
  return float(diff / ref)


def _max_difference(a, b) -> float:
  return float(_norms(a, b)[2])


@pytest.fixture(scope="module")
def targets() -> str:
  """Every projection when the model's MLP is written with jnp.einsum (what qwix sees), else attention only."""
  env = Env("peft=lora")
  with env.activate():
    try:
      peft.lora_model(env.cfg, peft.PeftConfig.from_config(env.config), env.mesh)
      return ALL
    except UserError as e:
      assert "layers/mlp/wi_0" in str(e) and "jnp.einsum" in str(e)
      return ".*attention"


@pytest.fixture(scope="module")
def scanned(targets) -> types.SimpleNamespace:
  """LoRA on the scanned model: (env, lm, base params, frozen base, fresh adapters)."""
  env = Env("peft=lora", f"lora_targets={targets}")
  with env.activate():
    return types.SimpleNamespace(env=env, **dict(zip(("lm", "params", "frozen", "trainable"), env.build())))


def _expected_adapter_params(cfg, rank: int, targets: str) -> int:
  """rank x (fan_in + fan_out) per adapted projection, per layer."""
  e, h, k, d, m = cfg.emb_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  attention = (e + h * d) + 2 * (e + k * d) + (h * d + e)   # query, key, value, out
  mlp = 2 * (e + m) + (m + e)                                 # wi_0, wi_1, wo
  return cfg.num_layers * rank * (attention + (mlp if targets == ALL else 0))


def test_lora_at_init_is_the_base_and_merge_folds_the_adapters(scanned):
  env, lm, params, frozen, trainable = scanned.env, scanned.lm, scanned.params, scanned.frozen, scanned.trainable
  with env.activate():
    base = _plain_forward(env.cfg)(params)
    assert _max_difference(_lora_logits(lm, frozen, trainable), base) <= 1e-6 * float(_norms(base, base)[3])

    tuned = _perturbed(lm, trainable)
    lora = _lora_logits(lm, frozen, tuned)
    assert _relative(lora, base) > 1e-2  # the adapters do something
    merged = peft.merge(lm, frozen, tuned)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    assert _relative(_plain_forward(env.cfg)(merged), lora) < 1e-5
    assert _max_difference(_lora_logits(lm, frozen, _adapters_off(lm, tuned)), base) == 0.0


def test_only_adapters_train_and_adamw_state_is_two_floats_per_adapter_param(scanned, targets):
  env, lm, params, frozen, trainable = scanned.env, scanned.lm, scanned.params, scanned.frozen, scanned.trainable
  with env.activate():
    flat = traverse_util.flatten_dict(trainable)
    assert flat and all(p[-1].endswith(("_lora_a", "_lora_b")) for p in flat)
    assert not any(p[-1].endswith(("_lora_a", "_lora_b")) for p in traverse_util.flatten_dict(frozen))
    assert jax.tree.structure(frozen) == jax.tree.structure(params)  # plain LoRA: the base is the plain params
    # sharded as the logical rules say: lora_a over the input's axis (embed -> fsdp), lora_b over the output's
    query_a = trainable["layers"]["attention"]["query_lora_a"]
    assert query_a.shape == (env.cfg.num_layers, env.cfg.emb_dim, env.config.lora_rank)
    assert query_a.sharding.spec[1] == "fsdp" and len(query_a.sharding.device_set) == 8

    n_adapters = peft.num_adapter_params(lm)
    assert n_adapters == _expected_adapter_params(env.cfg, env.config.lora_rank, targets)
    tx = optax.adamw(1e-2)
    opt_state = tx.init(trainable)
    floats = sum(x.size for x in jax.tree.leaves(opt_state) if jnp.issubdtype(x.dtype, jnp.floating))
    assert floats == 2 * n_adapters

    def loss(trainable, frozen):
      logits = peft.model(lm, frozen, trainable)(TOKENS, POSITIONS, SEGMENTS)
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), TOKENS[..., None], -1))

    @jax.jit
    def step(trainable, opt_state, frozen):
      value, grads = jax.value_and_grad(loss)(trainable, frozen)
      updates, opt_state = tx.update(grads, opt_state, trainable)
      return optax.apply_updates(trainable, updates), opt_state, value, grads

    trainable, opt_state, first, grads = step(trainable, opt_state, frozen)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    lora_b = [g for p, g in traverse_util.flatten_dict(grads).items() if p[-1].endswith("_lora_b")]
    assert all(float(jnp.abs(g).max()) > 0 for g in lora_b)  # (lora_a's gradient is 0 while lora_b is 0)
    for _ in range(3):
      trainable, opt_state, value, _ = step(trainable, opt_state, frozen)
    assert float(value) < float(first)


def _bits(dtype) -> int:
  return jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer) else jnp.finfo(dtype).bits


def test_qlora_nf4_is_close_to_full_precision_in_a_quarter_of_the_memory(scanned, targets):
  env = Env("peft=qlora", f"lora_targets={targets}", "qlora_tile_size=64")
  params, trainable = scanned.params, scanned.trainable  # the same model: same base params, same adapter shapes
  with env.activate():
    lm = peft.lora_model(env.cfg, peft.PeftConfig.from_config(env.config), env.mesh)
    frozen = peft.frozen_from_params(lm, params)
    assert jax.tree.structure(peft.init_adapters(lm, 0)) == jax.tree.structure(trainable)
    base = _plain_forward(env.cfg)(params)
    # weights: nf4 with one scale per 64 keeps ~9% relative RMS error on N(0, 0.02) weights
    merged = traverse_util.flatten_dict(peft.merge(lm, frozen, trainable))
    for t in lm.targets:
      assert 0.05 < _relative(merged[t.path], traverse_util.flatten_dict(params)[t.path]) < 0.11, t.path
    # logits: this random model amplifies that ~2x (measured 0.20); int8 stays near 1% (measured 0.013)
    assert _relative(_lora_logits(lm, frozen, trainable), base) < 0.3
    lm8 = peft.lora_model(env.cfg, dataclasses.replace(lm.peft, qlora_dtype="int8"), env.mesh)
    assert _relative(_lora_logits(lm8, peft.frozen_from_params(lm8, params), trainable), base) < 0.03
    # the QLoRA forward is the plain model on the dequantized weights with the adapters folded in
    tuned = _perturbed(lm, trainable)
    assert _relative(_plain_forward(env.cfg)(peft.merge(lm, frozen, tuned)), _lora_logits(lm, frozen, tuned)) < 1e-5

    # memory of the quantized projections: 4-bit values + a float32 scale per 64 -> 4.5 bits vs bf16's 16
    quantized = [v for p, v in traverse_util.flatten_dict(frozen).items() if "array" in p]
    assert {str(v.dtype) for v in quantized} == {"uint4", "float32"}
    q_bits = sum(v.size * _bits(v.dtype) for v in quantized)
    bf16_bits = sum(math.prod(t.shape) * 16 for t in lm.targets)
    assert 0.25 < q_bits / bf16_bits < 0.29
    # ... and XLA stores uint4 two to a byte: the buffers are what the bit count says
    abstract = [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in quantized]
    stored = jax.jit(lambda x: x).lower(abstract).compile().memory_analysis().argument_size_in_bytes
    assert abs(stored - q_bits / 8) <= 64 * len(quantized)


def _unstack(tree: dict, num_layers: int) -> dict:
  return {**tree, "layers": {i: jax.tree.map(lambda x, i=i: x[i], tree["layers"]) for i in range(num_layers)}}


def test_qlora_unscanned_and_adapters_off_is_the_quantized_base(scanned, targets):
  env = Env("peft=qlora", f"lora_targets={targets}", "scan_layers=false", "qlora_dtype=int4", "qlora_tile_size=32")
  with env.activate():
    lm = peft.lora_model(env.cfg, peft.PeftConfig.from_config(env.config), env.mesh)
    assert ("layers", 1, "attention", "query") in {t.path for t in lm.targets}
    n = env.cfg.num_layers
    params = jax.jit(lambda p: _unstack(p, n), out_shardings=lm.param_shardings)(scanned.params)
    tuned = _perturbed(scanned.lm, scanned.trainable)
    trainable = jax.jit(lambda t: _unstack(t, n), out_shardings=lm.trainable_shardings)(tuned)
    frozen = peft.frozen_from_params(lm, params, donate=True)
    dequantized_base = _lora_logits(lm, frozen, _adapters_off(lm, trainable))
    zeros = jax.jit(lambda t: jax.tree.map(jnp.zeros_like, t), out_shardings=lm.trainable_shardings)(trainable)
    assert _max_difference(_lora_logits(lm, frozen, zeros), dequantized_base) == 0.0
    assert _relative(dequantized_base, _plain_forward(scanned.env.cfg)(scanned.params)) < 0.3
    merged = peft.merge(lm, frozen, trainable)
    assert _relative(_plain_forward(env.cfg)(merged), _lora_logits(lm, frozen, trainable)) < 1e-5


def test_clear_errors(targets):
  env = Env("peft=qlora")
  with env.activate():
    with pytest.raises(UserError, match=r"qlora_tile_size=48 does not tile layers/attention/query's contracting "
                                        r"dimensions 128"):
      env.build(qlora_dtype="nf4", tile_size=48, targets=targets)
    with pytest.raises(UserError, match="matches no projection"):
      env.build(targets="layers/nothing")
  with pytest.raises(UserError, match="lora_targets"):
    peft.PeftConfig(targets="(")
  assert peft.PeftConfig.from_config(_load()) is None  # peft: none
