"""Our logits for a Hugging Face checkpoint against golden logits from transformers.

  python3 end_to_end/hf_parity/forward_pass_logit_checker.py --hf_path DIR --golden FILE.npz \
      [--atol 1e-4] [--dtype float32|bfloat16] [--max_kl 0]

Loads DIR with tunix_core's loader, computes logits for the golden's `tokens`, prints the max absolute
difference and the mean KL(golden || ours) per token, and exits 0 only within tolerance (--atol for the
logits; --max_kl, when > 0, bounds the KL instead — for bfloat16 compute).
"""

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tunix_core import config as config_lib, train
from tunix_core.errors import UserError


def our_logits(hf_path: str, tokens: np.ndarray, dtype: str, extra: list[str] = ()) -> np.ndarray:
  """Logits [B, S, V] float32 of our model loaded from hf_path, for unpacked rows of tokens."""
  config = config_lib.load(["configs/base.yml", f"hf_path={hf_path}", f"dtype={dtype}", "weight_dtype=float32",
                            f"max_target_length={tokens.shape[1]}", *extra], initialize_distributed=False)
  setup = train.build(config)
  with setup.activate():
    params = setup.initial_state(config, None, None)["params"]
    model = nnx.merge(setup.graphdef, params)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits = jax.jit(lambda t, p: model(t, p, jnp.ones_like(t)))(jnp.asarray(tokens), positions)
  return np.asarray(jax.device_get(logits), np.float32)


def compare(golden: np.ndarray, ours: np.ndarray) -> tuple[float, float]:
  """(max |golden - ours|, mean over tokens of KL(softmax golden || softmax ours)), in float64."""
  golden, ours = golden.astype(np.float64), ours.astype(np.float64)
  log_p = golden - np.logaddexp.reduce(golden, axis=-1, keepdims=True)
  log_q = ours - np.logaddexp.reduce(ours, axis=-1, keepdims=True)
  kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
  return float(np.max(np.abs(golden - ours))), float(np.mean(kl))


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--hf_path", required=True)
  parser.add_argument("--golden", required=True)
  parser.add_argument("--atol", type=float, default=1e-4)
  parser.add_argument("--max_kl", type=float, default=0.0)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  args = parser.parse_args()
  golden = np.load(args.golden)
  try:
    ours = our_logits(args.hf_path, golden["tokens"], args.dtype)
  except UserError as e:
    print(f"forward_pass_logit_checker: error: {e}", file=sys.stderr)
    return 2
  max_diff, kl = compare(golden["logits"], ours)
  ok = kl <= args.max_kl if args.max_kl > 0 else max_diff <= args.atol
  print(f"{args.hf_path}: max |logit diff| {max_diff:.3e}, mean KL {kl:.3e} ({args.dtype}) -> "
        f"{'PASS' if ok else 'FAIL'}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
