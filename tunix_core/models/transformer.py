"""THE decoder-only Transformer. Every model family is a ModelConfig of this one implementation.

Families differ in switches (q/k/v biases, q/k norms, Gemma's (1 + w) norms and scaled embeddings,
sandwich norms around attention and MLP), in numbers (soft-caps, sliding windows, query scaling) and in
rotary-embedding frequencies per layer. Parameters carry logical axis names (embed, heads, kv_heads,
head_dim, mlp, vocab, layers); the config's logical_axis_rules place them on the mesh.
"""

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from tunix_core.models import attention as attention_lib, cached_attention
from tunix_core.sharding import shard_activation, shard_count

REMAT_POLICIES = ("none", "full", "minimal", "save_qkv_proj", "save_out_proj", "save_dot_except_mlp")
ACTIVATIONS = {"silu": jax.nn.silu, "gelu": jax.nn.gelu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
               "relu": jax.nn.relu, "linear": lambda x: x}
ROPE_TYPES = ("default", "linear", "llama3")
INTERMEDIATES = ("layer_outputs", "attention_probs")  # what Transformer.hidden_states can also return per layer
SLIDING, FULL = "sliding_attention", "full_attention"


@dataclasses.dataclass(frozen=True)
class FamilyTraits:
  """Structural switches that set one model family apart; numbers live in ModelConfig."""
  qkv_bias: bool = False        # Qwen 2: biases on the q/k/v projections
  qk_norm: bool = False         # Qwen 3, Gemma 3: RMSNorm over head_dim of queries and keys
  norm_plus_one: bool = False   # Gemma: norms scale by (1 + w)
  scale_embeddings: bool = False  # Gemma: embeddings times sqrt(emb_dim)
  sandwich_norm: bool = False   # Gemma 2/3: norms after attention and around the MLP too


FAMILIES = {
    "llama": FamilyTraits(),
    "qwen2": FamilyTraits(qkv_bias=True),
    "qwen3": FamilyTraits(qk_norm=True),
    "gemma": FamilyTraits(norm_plus_one=True, scale_embeddings=True),
    "gemma2": FamilyTraits(norm_plus_one=True, scale_embeddings=True, sandwich_norm=True),
    "gemma3": FamilyTraits(qk_norm=True, norm_plus_one=True, scale_embeddings=True, sandwich_norm=True),
}


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
  family: str = "llama"
  mlp_activations: tuple[str, ...] = ("silu", "linear")
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  local_rope_theta: float = 0.0          # sliding layers' own rope base (unscaled); 0 = as the full layers
  sliding_window: int = 0
  layer_types: tuple[str, ...] = ()      # repeated cyclically over the layers; () = all full attention
  attn_logit_softcap: float = 0.0
  final_logit_softcap: float = 0.0
  query_pre_attn_scalar: float = 0.0     # queries scaled by its -1/2 power; 0 = head_dim
  tied_embeddings: bool = True
  dtype: Any = jnp.float32
  weight_dtype: Any = jnp.float32
  scan_layers: bool = True
  remat_policy: str = "none"
  attention: str = "auto"
  init_std: float = 0.02

  @property
  def traits(self) -> FamilyTraits:
    return FAMILIES[self.family]

  @classmethod
  def from_config(cls, config) -> "ModelConfig":
    return cls(
        vocab_size=config.vocab_size, emb_dim=config.base_emb_dim, num_heads=config.base_num_query_heads,
        num_kv_heads=config.base_num_kv_heads, head_dim=config.head_dim, mlp_dim=config.base_mlp_dim,
        num_layers=config.base_num_decoder_layers, family=config.decoder_block,
        mlp_activations=tuple(config.mlp_activations), norm_eps=config.normalization_layer_epsilon,
        rope_theta=config.rope_max_timescale, rope_type=config.rope_type, rope_factor=config.rope_factor,
        rope_low_freq_factor=config.rope_low_freq_factor, rope_high_freq_factor=config.rope_high_freq_factor,
        rope_original_max_position=config.rope_original_max_position,
        local_rope_theta=config.local_rope_max_timescale, sliding_window=config.sliding_window_size,
        layer_types=tuple(config.layer_types), attn_logit_softcap=config.attn_logits_soft_cap,
        final_logit_softcap=config.final_logits_soft_cap, query_pre_attn_scalar=config.query_pre_attn_scalar,
        tied_embeddings=config.logits_via_embedding, dtype=jnp.dtype(config.dtype),
        weight_dtype=jnp.dtype(config.weight_dtype), scan_layers=config.scan_layers,
        remat_policy=config.remat_policy, attention=config.attention, init_std=config.init_weights_std)

  def layer_kinds(self) -> list[str]:
    """Each layer's attention kind, SLIDING or FULL."""
    pattern = self.layer_types or (FULL,)
    return [pattern[i % len(pattern)] for i in range(self.num_layers)]

  def inv_frequencies(self) -> np.ndarray:
    """Rotary inverse frequencies per layer, float32 [num_layers, head_dim // 2] (Hugging Face's formulas)."""
    half = self.head_dim // 2
    exponents = np.arange(0, self.head_dim, 2, dtype=np.float32) / np.float32(self.head_dim)

    def base(theta: float) -> np.ndarray:
      return (1.0 / np.power(np.float32(theta), exponents)).astype(np.float32)

    full = base(self.rope_theta)
    if self.rope_type == "linear":
      full = full / np.float32(self.rope_factor)
    elif self.rope_type == "llama3":
      full = _llama3_scaling(full, self.rope_factor, self.rope_low_freq_factor, self.rope_high_freq_factor,
                             self.rope_original_max_position)
    local = base(self.local_rope_theta) if self.local_rope_theta else full
    table = [local if kind == SLIDING else full for kind in self.layer_kinds()]
    return np.stack(table).astype(np.float32).reshape(self.num_layers, half)

  def windows(self) -> np.ndarray:
    """Each layer's sliding window in keys (0 = unlimited), int32 [num_layers]."""
    return np.array([self.sliding_window if kind == SLIDING else 0 for kind in self.layer_kinds()], np.int32)


def _llama3_scaling(inv_freq: np.ndarray, factor: float, low: float, high: float, original: int) -> np.ndarray:
  """Llama 3.1's frequency-dependent rope scaling: long wavelengths divided by factor, short ones kept,
  the band between interpolated (transformers' _compute_llama3_parameters)."""
  wavelength = 2 * math.pi / inv_freq
  scaled = np.where(wavelength > original / low, inv_freq / factor, inv_freq)
  smooth = (original / wavelength - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelength < original / high) & ~(wavelength > original / low)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], cfg: ModelConfig,
           init=None) -> nnx.Param:
  init = init or nnx.initializers.normal(cfg.init_std)
  return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), shape, cfg.weight_dtype))


class RMSNorm(nnx.Module):
  """Root-mean-square norm computed in float32; Gemma scales by (1 + w) with w initialised to 0."""

  def __init__(self, dim: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.eps = cfg.norm_eps
    self.plus_one = cfg.traits.norm_plus_one
    init = nnx.initializers.zeros if self.plus_one else nnx.initializers.ones
    self.scale = _param(rngs, (dim,), ("norm",), cfg, init=init)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(jnp.float32)
    return (normed * (1.0 + scale if self.plus_one else scale)).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding, rotate-half layout (Hugging Face): x [B, S, H, D], positions [B, S], inv_freq [D/2]."""
  half = x.shape[-1] // 2
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, S, half]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def token_rows(x: jax.Array) -> tuple[jax.Array, str, tuple[str, ...]]:
  """x [B, S, E] as a projection's input, with the einsum letters and logical axes of its leading dimensions:
  flattened to [B*S, E] ("t") unless the mesh splits the sequence, whose shards a merge with the batch would
  move. On CPU, XLA computed the weight gradients of [B, S, E] projections through transposing copies; flat, the
  packed GRPO update on the bundled task takes ~0.4 s instead of ~0.6 s (benchmarks/RESULTS.md)."""
  if shard_count("activation_length") > 1:
    return x, "bs", ("activation_batch", "activation_length")
  return x.reshape(-1, x.shape[-1]), "t", ("activation_batch",)


class KVCache(NamedTuple):
  """Keys and values of every layer, preallocated for generation: tuples of L arrays [B, K, T, D], separate
  buffers that each decode step updates in place. Heads come before entries so that a decode step reads each
  (row, kv head) as one contiguous [T, D] matrix; with [B, T, K, D], XLA on CPU transposed every layer's cache
  at every step (benchmarks/RESULTS.md, "Sampler")."""
  key: tuple[jax.Array, ...]
  value: tuple[jax.Array, ...]


class LayerCache(NamedTuple):
  """One layer's part of a KVCache: the arrays it updates and the entries each row already holds."""
  key: jax.Array
  value: jax.Array
  lengths: jax.Array          # int32 [B]: cached entries per row = the position of a decoded token


CACHE_AXES = ("activation_batch", "activation_kv_heads", None, None)


class Attention(nnx.Module):
  """Grouped-query self-attention with rotary embeddings; attention never crosses segments."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    e, h, k, d = cfg.emb_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.query = _param(rngs, (e, h, d), ("embed", "heads", "head_dim"), cfg)
    self.key = _param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), cfg)
    self.value = _param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), cfg)
    self.out = _param(rngs, (h, d, e), ("heads", "head_dim", "embed"), cfg)
    if cfg.traits.qkv_bias:
      zeros = nnx.initializers.zeros
      self.query_bias = _param(rngs, (h, d), ("heads", "head_dim"), cfg, init=zeros)
      self.key_bias = _param(rngs, (k, d), ("kv_heads", "head_dim"), cfg, init=zeros)
      self.value_bias = _param(rngs, (k, d), ("kv_heads", "head_dim"), cfg, init=zeros)
    if cfg.traits.qk_norm:
      self.query_norm = RMSNorm(d, cfg, rngs=rngs)
      self.key_norm = RMSNorm(d, cfg, rngs=rngs)

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, inv_freq: jax.Array,
               window: jax.Array, cache: LayerCache | None = None, with_probs: bool = False,
               group_layout: attention_lib.GroupLayout | None = None):
    """Attention output [B, S, E]; with a cache also the updated LayerCache (see Transformer.hidden_states); with
    with_probs (no cache) also the attention probabilities [B, H, S, S]; with group_layout, rows laid out as it
    says (no cache)."""
    cfg = self.cfg
    dt = cfg.dtype
    batch, length, emb = x.shape
    h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    rows, t, _ = token_rows(x)
    q = jnp.einsum(f"{t}e,ehd->{t}hd", rows, self.query[...].astype(dt)).reshape(batch, length, h, d)
    k = jnp.einsum(f"{t}e,ekd->{t}kd", rows, self.key[...].astype(dt)).reshape(batch, length, kv, d)
    v = jnp.einsum(f"{t}e,ekd->{t}kd", rows, self.value[...].astype(dt)).reshape(batch, length, kv, d)
    if cfg.traits.qkv_bias:
      q = q + self.query_bias[...].astype(dt)
      k = k + self.key_bias[...].astype(dt)
      v = v + self.value_bias[...].astype(dt)
    q = checkpoint_name(q, "query_proj")
    k = checkpoint_name(k, "key_proj")
    v = checkpoint_name(v, "value_proj")
    if cfg.traits.qk_norm:
      q, k = self.query_norm(q), self.key_norm(k)
    q = shard_activation(q, ("activation_batch", "activation_length", "activation_heads", None))
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
    if cache is not None and q.shape[1] == 1:
      attended, cache = self._decode(q, k, v, cache, scale, window)
    elif group_layout is not None:
      attended = attention_lib.grouped_attention(q, k, v, positions, segment_ids, group_layout, scale, window,
                                                 cfg.attn_logit_softcap)
    else:
      attended = attention_lib.attend(q, k, v, segment_ids, scale=scale, window=window,
                                      static_window=cfg.sliding_window, logit_softcap=cfg.attn_logit_softcap,
                                      implementation=cfg.attention, return_probs=with_probs)
      if with_probs:
        attended, probs = attended
      if cache is not None:
        cache = self._store_prefill(k, v, cache)
    attended = attended.reshape(*rows.shape[:-1], *attended.shape[2:])
    out = jnp.einsum(f"{t}hd,hde->{t}e", attended, self.out[...].astype(dt)).reshape(batch, length, emb)
    out = checkpoint_name(out, "out_proj")
    if with_probs:
      return out, probs
    return out if cache is None else (out, cache)

  @staticmethod
  def _store_prefill(k: jax.Array, v: jax.Array, cache: LayerCache) -> LayerCache:
    """A prefill fills an empty cache from entry 0 (its chunk attended to itself above, as in training)."""
    def store(array, new):
      return jax.lax.dynamic_update_slice(array, new.swapaxes(1, 2).astype(array.dtype), (0, 0, 0, 0))
    return cache._replace(key=store(cache.key, k), value=store(cache.value, v))

  def _decode(self, q, k, v, cache: LayerCache, scale: float, window) -> tuple[jax.Array, LayerCache]:
    """One new token per row: its k/v are scattered in place at entry `lengths`, then it attends to entries
    0 .. lengths (the last `window` of them on sliding layers)."""
    cfg = self.cfg
    rows = jnp.arange(q.shape[0])
    key = cache.key.at[rows, :, cache.lengths].set(k[:, 0].astype(cache.key.dtype), mode="drop")
    value = cache.value.at[rows, :, cache.lengths].set(v[:, 0].astype(cache.value.dtype), mode="drop")
    cache = cache._replace(key=key, value=value)
    attended = cached_attention.attend_one(
        q[:, 0], key, value, cache.lengths + 1, scale=scale, window=window,
        logit_softcap=cfg.attn_logit_softcap, implementation=cfg.attention)
    return attended[:, None], cache


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
    # einsum rather than `@`: qwix attaches LoRA adapters to einsum calls (tunix_core/peft.py).
    rows, t, axes = token_rows(x)
    gate = checkpoint_name(jnp.einsum(f"{t}e,em->{t}m", rows, self.wi_0[...].astype(dt)), "mlpwi_0")
    up = checkpoint_name(jnp.einsum(f"{t}e,em->{t}m", rows, self.wi_1[...].astype(dt)), "mlpwi_1")
    hidden = shard_activation(gate_act(gate) * up_act(up), (*axes, "activation_mlp"))
    out = checkpoint_name(jnp.einsum(f"{t}m,me->{t}e", hidden, self.wo[...].astype(dt)), "mlpwo")
    return out.reshape(x.shape)


class DecoderLayer(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.)); Gemma 2/3 also norm each output."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.attention_norm = RMSNorm(cfg.emb_dim, cfg, rngs=rngs)
    self.attention = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.emb_dim, cfg, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)
    self.sandwich = cfg.traits.sandwich_norm
    if self.sandwich:
      self.post_attention_norm = RMSNorm(cfg.emb_dim, cfg, rngs=rngs)
      self.post_mlp_norm = RMSNorm(cfg.emb_dim, cfg, rngs=rngs)

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, inv_freq: jax.Array,
               window: jax.Array, cache: LayerCache | None = None, with_probs: bool = False,
               group_layout: attention_lib.GroupLayout | None = None):
    """The block's output; with a cache also the attention's updated LayerCache; with with_probs also the
    attention probabilities [B, H, S, S]."""
    out = self.attention(self.attention_norm(x), positions, segment_ids, inv_freq, window, cache, with_probs,
                         group_layout)
    attended, extra = out if cache is not None or with_probs else (out, None)  # extra: the cache or the probs
    x = x + (self.post_attention_norm(attended) if self.sandwich else attended)
    transformed = self.mlp(self.mlp_norm(x))
    x = x + (self.post_mlp_norm(transformed) if self.sandwich else transformed)
    x = shard_activation(x, ("activation_batch", "activation_length", "activation_embed"))
    return x if extra is None else (x, extra)


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

  def _run_layer(self, layer: DecoderLayer, x, *args, **static):
    if self.cfg.remat_policy == "none":
      return layer(x, *args, **static)
    graphdef, state = nnx.split(layer)
    run = jax.checkpoint(lambda s, *a: nnx.merge(graphdef, s)(*a, **static),
                         policy=remat_policy(self.cfg.remat_policy))
    return run(state, x, *args)

  def embed(self, tokens: jax.Array) -> jax.Array:
    """Token embeddings in the compute dtype (Gemma: times sqrt(emb_dim), rounded to the weight dtype first)."""
    cfg = self.cfg
    x = jnp.take(self.embedding[...], tokens, axis=0)
    if cfg.traits.scale_embeddings:
      x = x * jnp.asarray(math.sqrt(cfg.emb_dim), cfg.weight_dtype)
    return x.astype(cfg.dtype)

  def init_cache(self, batch: int, length: int) -> KVCache:
    """An empty KV cache for `batch` rows of up to `length` tokens, in the compute dtype, sharded by the logical
    rules (batch over data/fsdp, kv heads over tensor). Call it inside jit."""
    cfg = self.cfg
    shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)

    def zeros():
      return tuple(shard_activation(jnp.zeros(shape, cfg.dtype), CACHE_AXES) for _ in range(cfg.num_layers))
    return KVCache(zeros(), zeros())

  def unstack_layers(self) -> None:
    """Splits a scanned layer stack into one module per layer, in place (nothing to do when unscanned): the form
    generation needs. A decode step inside a while_loop that slices a stacked layer's weights copies them at
    every step: on an H100, a batch-1 llama3.2-1b decode step took 2.47x its memory floor scanned and 1.41x
    with one buffer per layer (benchmarks/RESULTS.md). Call it inside jit, before the decode loop, so the slices
    happen once; they hold a second copy of the layer weights for as long as the generation runs."""
    if not self.cfg.scan_layers:
      return
    graphdef, stacked = nnx.split(self.layers)
    self.layers = nnx.List([nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], stacked))
                            for i in range(self.cfg.num_layers)])
    self.cfg = dataclasses.replace(self.cfg, scan_layers=False)

  def hidden_states(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                    cache: KVCache | None = None, cache_lengths: jax.Array | None = None,
                    intermediates: tuple[str, ...] = (), group_layout: attention_lib.GroupLayout | None = None):
    """Final-norm hidden states [B, S, E] in the compute dtype (the head is applied separately, in chunks).

    With a cache (generation) it returns (hidden states, updated cache), in one of two ways chosen by S:
    S > 1 is a prefill from position 0 into an empty cache (attention within the chunk, exactly as training;
    padding gets its own segment id), S == 1 decodes one token per row at entry `cache_lengths` [B].

    intermediates (no cache; distillation) names per-layer values to return too, as (hidden states, dict):
    "layer_outputs" each layer's output [L, B, S, E] (the residual stream before the final norm) and
    "attention_probs" each layer's attention probabilities [L, B, H, S, S] in float32 (needs attention=xla).
    They are scan outputs, so () leaves the computation exactly as it was.

    group_layout (no cache): each row is one prompt and the completions sampled from it, laid out as it says
    (attention.grouped_attention); the model otherwise runs as on any rows.
    """
    cfg = self.cfg
    x = shard_activation(self.embed(tokens), ("activation_batch", "activation_length", "activation_embed"))
    inv_freq, windows = jnp.asarray(cfg.inv_frequencies()), jnp.asarray(cfg.windows())
    if cache is not None:
      return self._cached_layers(x, positions, segment_ids, inv_freq, windows, cache, cache_lengths)
    unknown = set(intermediates) - set(INTERMEDIATES)
    if unknown:
      raise ValueError(f"unknown intermediates {sorted(unknown)}; expected some of {INTERMEDIATES}")
    with_probs = "attention_probs" in intermediates

    def run(layer, x, layer_inv_freq, window):
      out = self._run_layer(layer, x, positions, segment_ids, layer_inv_freq, window, with_probs=with_probs,
                            group_layout=group_layout)
      x, probs = out if with_probs else (out, None)
      collected = {"layer_outputs": x, "attention_probs": probs}
      return x, {name: collected[name] for name in intermediates}

    if cfg.scan_layers:
      graphdef, stacked_state = nnx.split(self.layers)

      def body(carry, per_layer):
        layer_state, layer_inv_freq, window = per_layer
        return run(nnx.merge(graphdef, layer_state), carry, layer_inv_freq, window)

      x, collected = jax.lax.scan(body, x, (stacked_state, inv_freq, windows))
    else:
      per_layer = []
      for i, layer in enumerate(self.layers):
        x, values = run(layer, x, inv_freq[i], windows[i])
        per_layer.append(values)
      collected = {name: jnp.stack([values[name] for values in per_layer]) for name in intermediates}
    hidden = self.final_norm(x)
    return (hidden, collected) if intermediates else hidden

  def _cached_layers(self, x, positions, segment_ids, inv_freq, windows, cache: KVCache, lengths: jax.Array
                     ) -> tuple[jax.Array, KVCache]:
    """The layers with a KV cache, one module at a time (no rematerialisation: nothing is differentiated)."""
    if self.cfg.scan_layers:
      raise ValueError("generation with a KV cache needs one module per layer: call model.unstack_layers() first")
    keys, values = [], []
    for i, layer in enumerate(self.layers):
      x, updated = layer(x, positions, segment_ids, inv_freq[i], windows[i],
                         LayerCache(cache.key[i], cache.value[i], lengths))
      keys.append(updated.key)
      values.append(updated.value)
    return self.final_norm(x), KVCache(tuple(keys), tuple(values))

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Output-head logits for hidden states [..., E] -> [..., V] in float32 (soft-capped where configured)."""
    if self.cfg.tied_embeddings:
      kernel = self.embedding[...].astype(self.cfg.dtype).T
    else:
      kernel = self.head[...].astype(self.cfg.dtype)
    logits = (hidden @ kernel).astype(jnp.float32)
    cap = self.cfg.final_logit_softcap
    return cap * jnp.tanh(logits / cap) if cap else logits

  def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    return self.logits(self.hidden_states(tokens, positions, segment_ids))
