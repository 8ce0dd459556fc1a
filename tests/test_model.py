"""The decoder against an independent float64 numpy implementation, and its equivalences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tunix_core import models
from tunix_core.models.transformer import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=40, emb_dim=16, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=24, num_layers=2,
                  rope_theta=100.0, tied_embeddings=False, init_std=0.3)


def _numpy_forward(p: dict, tokens: np.ndarray, positions: np.ndarray, segment_ids: np.ndarray,
                   cfg: ModelConfig) -> np.ndarray:
  """Textbook Llama forward in float64 (rotate-half RoPE, GQA, SwiGLU, RMSNorm), written from the paper."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)

  def rms(x, w):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * w

  def rope(x):  # x [B, S, H, D]
    half = x.shape[-1] // 2
    freq = cfg.rope_theta ** (-np.arange(half) / half)
    ang = positions[:, :, None, None] * freq
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)], -1)

  x = p["embedding"][tokens]
  b, s = tokens.shape
  group = cfg.num_heads // cfg.num_kv_heads
  mask = np.tril(np.ones((s, s), bool))[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
  for i in range(cfg.num_layers):
    lp = jax.tree.map(lambda a, i=i: a[i], p["layers"])
    h = rms(x, lp["attention_norm"]["scale"])
    q = rope(np.einsum("bse,ehd->bshd", h, lp["attention"]["query"]))
    k = rope(np.einsum("bse,ekd->bskd", h, lp["attention"]["key"]))
    v = np.einsum("bse,ekd->bskd", h, lp["attention"]["value"])
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scores = np.einsum("bshd,bthd->bhst", q, k) / np.sqrt(cfg.head_dim)
    scores = np.where(mask[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    att = np.einsum("bhst,bthd->bshd", probs, v)
    x = x + np.einsum("bshd,hde->bse", att, lp["attention"]["out"])
    h = rms(x, lp["mlp_norm"]["scale"])
    gate = h @ lp["mlp"]["wi_0"]
    x = x + ((gate / (1 + np.exp(-gate))) * (h @ lp["mlp"]["wi_1"])) @ lp["mlp"]["wo"]
  return rms(x, p["final_norm"]["scale"]) @ p["head"]


def _init(cfg: ModelConfig, seed: int = 0):
  with nnx.use_eager_sharding(False):
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


def _inputs(batch=2, length=12, seed=1):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size, (batch, length)).astype(np.int32)
  positions = np.tile(np.arange(length, dtype=np.int32), (batch, 1))
  return tokens, positions, np.ones((batch, length), np.int32)


def test_forward_matches_float64_numpy_reference():
  graphdef, params = _init(CFG)
  tokens, positions, segments = _inputs()
  ours = nnx.merge(graphdef, params)(tokens, positions, segments)
  reference = _numpy_forward(params, tokens, positions, segments, CFG)
  np.testing.assert_allclose(np.asarray(ours), reference, atol=2e-5, rtol=1e-5)


def test_packed_segments_do_not_see_each_other():
  """A row packing two examples gives each the logits it gets alone (positions restart per example)."""
  graphdef, params = _init(CFG)
  model = nnx.merge(graphdef, params)
  tokens, _, _ = _inputs(batch=1, length=10)
  first, second = tokens[:, :4], tokens[:, 4:]
  packed = model(tokens, np.array([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]]), np.array([[1] * 4 + [2] * 6]))
  alone_first = model(first, np.arange(4)[None], np.ones((1, 4), np.int32))
  alone_second = model(second, np.arange(6)[None], np.ones((1, 6), np.int32))
  np.testing.assert_allclose(packed[:, :4], alone_first, atol=1e-5)
  np.testing.assert_allclose(packed[:, 4:], alone_second, atol=1e-5)


def test_scan_and_loop_layers_agree():
  graphdef, params = _init(CFG)
  loop_cfg = ModelConfig(**{**CFG.__dict__, "scan_layers": False})
  loop_graphdef, loop_params = _init(loop_cfg)
  # The loop model keeps layers as a list; give it the same weights, layer i from the scanned slice i.
  loop_params.update({k: v for k, v in params.items() if k != "layers"})
  for i in range(CFG.num_layers):
    loop_params["layers"][i] = jax.tree.map(lambda a, i=i: a[i], params["layers"])
  tokens, positions, segments = _inputs()
  np.testing.assert_allclose(nnx.merge(graphdef, params)(tokens, positions, segments),
                             nnx.merge(loop_graphdef, loop_params)(tokens, positions, segments), atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "minimal", "save_qkv_proj"])
def test_remat_policies_keep_gradients(policy):
  graphdef, params = _init(CFG)
  remat_graphdef, _ = _init(ModelConfig(**{**CFG.__dict__, "remat_policy": policy}))
  tokens, positions, segments = _inputs()

  def loss(gd, p):
    return jnp.sum(nnx.merge(gd, p)(tokens, positions, segments) ** 2)

  expected = jax.grad(lambda p: loss(graphdef, p))(params)
  got = jax.grad(lambda p: loss(remat_graphdef, p))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), expected, got)


def test_tied_head_uses_the_embedding():
  tied = ModelConfig(**{**CFG.__dict__, "tied_embeddings": True})
  graphdef, params = _init(tied)
  assert "head" not in params
  model = nnx.merge(graphdef, params)
  hidden = jnp.ones((1, 1, CFG.emb_dim))
  np.testing.assert_allclose(model.logits(hidden)[0, 0], params["embedding"].sum(axis=1), rtol=1e-6)


def test_parameter_count_matches_the_formula():
  _, abstract_state = models.abstract_model(CFG)
  e, h, k, d, m, v, n = 16, 4, 2, 8, 24, 40, 2
  per_layer = e * h * d + 2 * e * k * d + h * d * e + 3 * e * m + 2 * e
  assert models.num_params(nnx.to_pure_dict(abstract_state)) == v * e + n * per_layer + e + e * v
