"""THE decoder-only Transformer. Every model family is a ModelConfig of this one implementation.

Parameters carry logical axis names (embed, heads, kv_heads, head_dim, mlp, vocab, layers); the
config's logical_axis_rules place them on the mesh. Activations are constrained the same way.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from tunix_core.models import attention as attention_lib
from tunix_core.sharding import shard_activation

# Names given to intermediate values so remat policies can choose what to keep for the backward pass.
REMAT_POLICIES = ("none", "full", "minimal", "save_qkv_proj", "save_out_proj", "save_dot_except_mlp")
ACTIVATIONS = {"silu": jax.nn.silu, "gelu": jax.nn.gelu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
               "relu": jax.nn.relu, "linear": lambda x: x}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of one decoder; built from the run config by `from_config`."""
  vocab_size: int
  emb_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  num_layers: int
  mlp_activations: tuple[str, ...] = ("silu", "linear")
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  tied_embeddings: bool = True
  dtype: Any = jnp.float32
  weight_dtype: Any = jnp.float32
  scan_layers: bool = True
  remat_policy: str = "none"
  attention: str = "dot_product"
  init_std: float = 0.02

  @classmethod
  def from_config(cls, config) -> "ModelConfig":
    return cls(
        vocab_size=config.vocab_size, emb_dim=config.base_emb_dim, num_heads=config.base_num_query_heads,
        num_kv_heads=config.base_num_kv_heads, head_dim=config.head_dim, mlp_dim=config.base_mlp_dim,
        num_layers=config.base_num_decoder_layers, mlp_activations=tuple(config.mlp_activations),
        norm_eps=config.normalization_layer_epsilon, rope_theta=config.rope_max_timescale,
        tied_embeddings=config.logits_via_embedding, dtype=jnp.dtype(config.dtype),
        weight_dtype=jnp.dtype(config.weight_dtype), scan_layers=config.scan_layers,
        remat_policy=config.remat_policy, attention=config.attention, init_std=config.init_weights_std)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], cfg: ModelConfig,
           init=None) -> nnx.Param:
  init = init or nnx.initializers.normal(cfg.init_std)
  return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), shape, cfg.weight_dtype))


class RMSNorm(nnx.Module):
  """Root-mean-square layer norm, computed in float32."""

  def __init__(self, dim: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.eps = cfg.norm_eps
    self.scale = _param(rngs, (dim,), ("norm",), cfg, init=nnx.initializers.ones)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding in the rotate-half layout of Hugging Face Llama: x [B, S, H, D], positions [B, S]."""
  half = x.shape[-1] // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, S, half]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
  """Grouped-query self-attention with rotary embeddings; attention never crosses segments."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    e, h, k, d = cfg.emb_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.query = _param(rngs, (e, h, d), ("embed", "heads", "head_dim"), cfg)
    self.key = _param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), cfg)
    self.value = _param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), cfg)
    self.out = _param(rngs, (h, d, e), ("heads", "head_dim", "embed"), cfg)

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    cfg = self.cfg
    dt = cfg.dtype
    q = jnp.einsum("bse,ehd->bshd", x, self.query[...].astype(dt))
    k = jnp.einsum("bse,ekd->bskd", x, self.key[...].astype(dt))
    v = jnp.einsum("bse,ekd->bskd", x, self.value[...].astype(dt))
    q = checkpoint_name(q, "query_proj")
    k = checkpoint_name(k, "key_proj")
    v = checkpoint_name(v, "value_proj")
    q = shard_activation(q, ("activation_batch", "activation_length", "activation_heads", None))
    q = apply_rope(q, positions, cfg.rope_theta)
    k = apply_rope(k, positions, cfg.rope_theta)
    attended = attention_lib.attend(q, k, v, segment_ids, scale=cfg.head_dim ** -0.5, implementation=cfg.attention)
    out = jnp.einsum("bshd,hde->bse", attended, self.out[...].astype(dt))
    return checkpoint_name(out, "out_proj")


class MLP(nnx.Module):
  """Gated MLP: act0(x W_gate) * act1(x W_up), then W_down."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.wi_0 = _param(rngs, (cfg.emb_dim, cfg.mlp_dim), ("embed", "mlp"), cfg)
    self.wi_1 = _param(rngs, (cfg.emb_dim, cfg.mlp_dim), ("embed", "mlp"), cfg)
    self.wo = _param(rngs, (cfg.mlp_dim, cfg.emb_dim), ("mlp", "embed"), cfg)

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.cfg.dtype
    gate_act, up_act = (ACTIVATIONS[a] for a in self.cfg.mlp_activations)
    gate = checkpoint_name(x @ self.wi_0[...].astype(dt), "mlpwi_0")
    up = checkpoint_name(x @ self.wi_1[...].astype(dt), "mlpwi_1")
    hidden = shard_activation(gate_act(gate) * up_act(up), ("activation_batch", "activation_length", "activation_mlp"))
    return checkpoint_name(hidden @ self.wo[...].astype(dt), "mlpwo")


class DecoderLayer(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.attention_norm = RMSNorm(cfg.emb_dim, cfg, rngs=rngs)
    self.attention = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.emb_dim, cfg, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    x = x + self.attention(self.attention_norm(x), positions, segment_ids)
    x = x + self.mlp(self.mlp_norm(x))
    return shard_activation(x, ("activation_batch", "activation_length", "activation_embed"))


def remat_policy(name: str):
  """The jax.checkpoint policy for a remat_policy name (None = no rematerialisation)."""
  names = jax.checkpoint_policies.save_only_these_names
  return {
      "none": None,
      "full": jax.checkpoint_policies.nothing_saveable,
      "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
      "save_qkv_proj": names("query_proj", "key_proj", "value_proj"),
      "save_out_proj": names("out_proj"),
      "save_dot_except_mlp": names("query_proj", "key_proj", "value_proj", "out_proj"),
  }[name]


class Transformer(nnx.Module):
  """Token embedding -> decoder layers -> final norm -> output head (tied or untied)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embedding = _param(rngs, (cfg.vocab_size, cfg.emb_dim), ("vocab", "embed"), cfg)
    if cfg.scan_layers:
      @nnx.split_rngs(splits=cfg.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def stacked(layer_rngs: nnx.Rngs) -> DecoderLayer:
        return DecoderLayer(cfg, rngs=layer_rngs)
      self.layers = stacked(rngs)
    else:
      self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.emb_dim, cfg, rngs=rngs)
    if not cfg.tied_embeddings:
      self.head = _param(rngs, (cfg.emb_dim, cfg.vocab_size), ("embed", "vocab"), cfg)

  def _run_layer(self, layer: DecoderLayer, x, positions, segment_ids):
    policy = remat_policy(self.cfg.remat_policy)
    if self.cfg.remat_policy == "none":
      return layer(x, positions, segment_ids)
    graphdef, state = nnx.split(layer)
    run = jax.checkpoint(lambda s, *args: nnx.merge(graphdef, s)(*args), policy=policy)
    return run(state, x, positions, segment_ids)

  def hidden_states(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Final-norm hidden states [B, S, E] in the compute dtype (the head is applied separately, in chunks)."""
    cfg = self.cfg
    x = jnp.take(self.embedding[...], tokens, axis=0).astype(cfg.dtype)
    x = shard_activation(x, ("activation_batch", "activation_length", "activation_embed"))
    if cfg.scan_layers:
      graphdef, stacked_state = nnx.split(self.layers)

      def body(carry, layer_state):
        return self._run_layer(nnx.merge(graphdef, layer_state), carry, positions, segment_ids), None

      x, _ = jax.lax.scan(body, x, stacked_state)
    else:
      for layer in self.layers:
        x = self._run_layer(layer, x, positions, segment_ids)
    return self.final_norm(x)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Output-head logits for hidden states [..., E] -> [..., V] in float32."""
    if self.cfg.tied_embeddings:
      kernel = self.embedding[...].astype(self.cfg.dtype).T
    else:
      kernel = self.head[...].astype(self.cfg.dtype)
    return (hidden @ kernel).astype(jnp.float32)

  def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    return self.logits(self.hidden_states(tokens, positions, segment_ids))
