"""The decoder's optional per-layer intermediates (distillation): off by default, consistent when on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tunix_core.models import attention as attention_lib
from tunix_core.models.transformer import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=40, emb_dim=16, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=24, num_layers=3,
                  rope_theta=100.0, init_std=0.3, attention="xla")
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 40, size=(2, 6)), jnp.int32)
SEGMENTS = jnp.asarray([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]], jnp.int32)
POSITIONS = jnp.asarray([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]], jnp.int32)


def _model(**changes) -> Transformer:
  """The model with seeded numpy weights (faster than compiling the initialisers on 8 simulated devices)."""
  cfg = ModelConfig(**{**CFG.__dict__, **changes})
  with nnx.use_eager_sharding(False):
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  return nnx.merge(graphdef, jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.3, a.dtype), abstract))


@pytest.mark.parametrize("scan_layers,remat_policy", [(True, "full"), (False, "none")])
def test_intermediates(scan_layers, remat_policy):
  model = _model(scan_layers=scan_layers, remat_policy=remat_policy)
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state):
    model = nnx.merge(graphdef, state)
    return model.hidden_states(TOKENS, POSITIONS, SEGMENTS), model.hidden_states(
        TOKENS, POSITIONS, SEGMENTS, intermediates=("layer_outputs", "attention_probs"))

  plain, (hidden, values) = forward(state)
  np.testing.assert_allclose(hidden, plain, rtol=1e-6, atol=1e-6)
  outputs, probs = values["layer_outputs"], values["attention_probs"]
  assert outputs.shape == (3, 2, 6, 16) and probs.shape == (3, 2, 4, 6, 6) and probs.dtype == jnp.float32
  np.testing.assert_allclose(model.final_norm(outputs[-1]), hidden, rtol=1e-6)
  mask = np.asarray(attention_lib.attention_mask(SEGMENTS))[None, :, None]
  np.testing.assert_allclose(np.sum(probs, axis=-1), 1.0, rtol=1e-5)
  assert not np.any(np.asarray(probs) * ~mask)
  # Layer 0's probabilities from its own query/key projections of the embeddings.
  layer = jax.tree.map(lambda a: a[0], nnx.to_pure_dict(nnx.state(model.layers))) if scan_layers else \
      nnx.to_pure_dict(nnx.state(model.layers[0]))
  x = model.embed(TOKENS)
  h = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + CFG.norm_eps) * layer["attention_norm"]["scale"]
  inv_freq = jnp.asarray(model.cfg.inv_frequencies()[0])
  from tunix_core.models.transformer import apply_rope  # pylint: disable=import-outside-toplevel
  q = apply_rope(jnp.einsum("bse,ehd->bshd", h, layer["attention"]["query"]), POSITIONS, inv_freq)
  k = apply_rope(jnp.einsum("bse,ekd->bskd", h, layer["attention"]["key"]), POSITIONS, inv_freq)
  k = jnp.repeat(k, 2, axis=2)
  scores = np.einsum("bshd,bthd->bhst", q, k) / np.sqrt(CFG.head_dim)
  scores = np.where(mask[0], scores, -np.inf)
  expected = np.exp(scores - scores.max(-1, keepdims=True))
  np.testing.assert_allclose(probs[0], expected / expected.sum(-1, keepdims=True), rtol=1e-4, atol=1e-6)


def test_attention_probabilities_need_xla():
  with pytest.raises(ValueError, match="xla"):
    _model(attention="flash").hidden_states(TOKENS, POSITIONS, SEGMENTS, intermediates=("attention_probs",))
