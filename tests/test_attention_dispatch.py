"""attention=flash (the Pallas kernel, interpreted on CPU) gives the model the same numbers as attention=xla."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tunix_core import config as config_lib, train
from tunix_core.data import pipeline, tokenizer as tokenizer_lib
from tunix_core.models import attention as attention_lib
from tunix_core.models.transformer import ModelConfig, Transformer

# Gemma-2-like: GQA, sliding window on alternate layers, soft-capped scores.
CFG = ModelConfig(vocab_size=64, emb_dim=32, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=64, num_layers=2,
                  family="gemma2", layer_types=("sliding_attention", "full_attention"), sliding_window=5,
                  attn_logit_softcap=3.0, init_std=0.3, attention="xla")


def test_auto_follows_the_measured_rule():
  assert attention_lib.resolve("auto", "cpu") == "xla" and attention_lib.resolve("auto", "tpu") == "xla"
  assert attention_lib.resolve("auto", "gpu", jnp.bfloat16) == "cudnn"
  assert attention_lib.resolve("auto", "gpu", jnp.float16) == "cudnn"
  # cuDNN has no soft-capping and no float32 path: our kernel covers both.
  assert attention_lib.resolve("auto", "gpu", jnp.bfloat16, logit_softcap=50.0) == "flash"
  assert attention_lib.resolve("auto", "gpu", jnp.float32) == "flash"
  assert attention_lib.resolve("cudnn", "cpu") == "cudnn" and attention_lib.resolve("xla", "gpu") == "xla"


def test_flash_model_matches_xla_model_with_gradients():
  with nnx.use_eager_sharding(False):
    graphdef, params = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))
    flash_graphdef, _ = nnx.split(Transformer(dataclasses.replace(CFG, attention="flash"), rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 64, (2, 24)), jnp.int32)
  segments = jnp.asarray([[1] * 10 + [2] * 14, [1] * 20 + [0] * 4], jnp.int32)
  positions = jnp.asarray([list(range(10)) + list(range(14)), list(range(20)) + [0] * 4], jnp.int32)
  mask = (segments > 0)[..., None]

  def loss(gd, p):
    return jnp.sum(jnp.where(mask, nnx.merge(gd, p)(tokens, positions, segments), 0.0) ** 2)

  np.testing.assert_allclose(loss(flash_graphdef, params), loss(graphdef, params), rtol=1e-5)
  expected = jax.grad(lambda p: loss(graphdef, p))(params)
  got = jax.grad(lambda p: loss(flash_graphdef, p))(params)
  # float32 sums in a different order: errors relative to each gradient's largest entry.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * np.max(np.abs(b))), got, expected)


def test_flash_train_step_under_a_mesh():
  """One train step on data=2 x fsdp=2 x tensor=2: the kernel runs per shard (batch and heads split, via
  shard_map) and matches XLA attention."""
  common = ["max_target_length=32", "per_device_batch_size=1", "base_num_decoder_layers=1",
            "ici_data_parallelism=2", "ici_fsdp_parallelism=2", "ici_tensor_parallelism=2"]
  losses = []
  for implementation in ("xla", "flash"):
    config = config_lib.load(["configs/base.yml", *common, f"attention={implementation}"],
                             initialize_distributed=False)
    batch = next(pipeline.make_train_iterator(config, tokenizer_lib.load_tokenizer(config.tokenizer_path)))
    setup = train.build(config)
    with setup.activate():
      state = setup.initial_state(config, None, None)
      _, metrics = setup.train_step(state, train.to_device_batch(batch, config, setup.train_batch_sharding,
                                                                 accumulate=True))
    losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
  np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
