"""Precomputed DPO reference log-probs (precompute_reference=true): one pass over the data replaces the frozen copy.

Before training, the starting weights (the reference DPO measures the policy against) run once over every pair of
the training set and of the eval set, in file order, and each pair's summed completion log-probs are kept in a
table indexed by the pair's place in its source: [pairs, 2], chosen then rejected. Batches carry each row's
`pair_index` (tunix_core/data/preference.py), and `attach` adds the row's reference log-prob as
batch["reference_logps"], which modes/dpo.py uses in place of a reference forward pass. What this saves is the
frozen copy of the weights in device memory (as large as the model, sharded like it) and the reference forward
pass of every step; it costs one forward pass over the data at each start (a resumed run repeats the pass from
the same starting weights, so it gets the same table).
"""

import functools

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tunix_core import distributed
from tunix_core.data import pipeline, preference
from tunix_core.data.tokenizer import Tokenizer
from tunix_core.modes import dpo

TOKEN_KEYS = pipeline.FEATURES


def compute_tables(config: ml_collections.FrozenConfigDict, setup, params, tokenizer: Tokenizer
                   ) -> dict[str, np.ndarray]:
  """{"train": [pairs, 2], "eval": [pairs, 2]} float32 reference log-probs of `params` (the plain model's
  weights, in setup.param_shardings) for every pair of each split. Pairs the data pipeline drops stay NaN: no batch
  ever asks for them. The same tables on every process."""
  replicated = NamedSharding(setup.mesh, PartitionSpec())
  log_probs = jax.jit(functools.partial(_row_log_probs, setup.graphdef, config), out_shardings=replicated)
  tables = {}
  for split in ("train", "eval"):
    num_pairs, batches = preference.make_preference_pass(config, tokenizer, split)
    table = np.full((num_pairs, 2), np.nan, np.float32)
    for local in batches:
      batch = distributed.global_batch({k: local[k] for k in (*TOKEN_KEYS, "pair_index")}, setup.eval_batch_sharding,
                                       config.micro_batch_size)
      row_log_probs, pair_index = jax.device_get(log_probs(params, batch))
      real = pair_index >= 0
      table[pair_index[real], np.arange(len(pair_index))[real] % 2] = row_log_probs[real]
    tables[split] = table
  return tables


def _row_log_probs(graphdef: nnx.GraphDef, config, params, batch: dict) -> tuple[jax.Array, jax.Array]:
  return dpo.sequence_log_probs(nnx.merge(graphdef, params), batch, config)[0], batch["pair_index"]


def attach(local_batch: dict[str, np.ndarray], table: np.ndarray) -> dict[str, np.ndarray]:
  """The batch with "reference_logps" [rows] (row 2i: pair i's chosen, 2i+1: its rejected; 0 for padding rows)."""
  pair_index = local_batch["pair_index"]
  side = np.arange(len(pair_index)) % 2
  values = np.where(pair_index >= 0, table[np.maximum(pair_index, 0), side], 0.0).astype(np.float32)
  return {**local_batch, "reference_logps": values}
