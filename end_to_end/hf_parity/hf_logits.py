"""Check a Hugging Face checkpoint directory against a golden logits file.

Runs in a SEPARATE environment with torch + transformers (never tunix_core's runtime):

    /tmp/hfenv/bin/python end_to_end/hf_parity/hf_logits.py \
        --hf_path end_to_end/hf_parity/checkpoints/llama3 \
        --golden end_to_end/hf_parity/goldens/llama3.npz [--atol 1e-4]

Loads DIR with AutoModelForCausalLM (float32, eager attention), runs the golden's ``tokens``
(int [B, S]; no attention mask, positions 0..S-1) and compares with the golden's ``logits``
(float32 [B, S, vocab]). Prints the max absolute difference and the mean over tokens of
KL(golden || ours). Exit status 0 when max |diff| <= atol, 1 otherwise (also on a shape
mismatch or non-finite logits), 2 on bad arguments / unloadable checkpoint.

tunix_core uses it to prove that checkpoints it EXPORTS load in transformers and give the
same logits as the model that exported them.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf_path", required=True, help="directory with config.json + *.safetensors")
    ap.add_argument("--golden", required=True, help=".npz with tokens [B, S] and logits [B, S, vocab]")
    ap.add_argument("--atol", type=float, default=1e-4, help="max allowed |logit difference| (default 1e-4)")
    args = ap.parse_args(argv)

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()

    golden = np.load(args.golden)
    if "tokens" not in golden or "logits" not in golden:
        print(f"error: {args.golden} must hold 'tokens' and 'logits'", file=sys.stderr)
        return 2
    tokens = golden["tokens"]
    want = golden["logits"].astype(np.float32)

    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            args.hf_path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
        )
    except Exception as e:  # noqa: BLE001 - any load failure is a usage/checkpoint error
        print(f"error: cannot load {args.hf_path}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    model.eval()
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        # A silently re-initialised or dropped tensor is a failed export even if logits look close.
        print(f"FAIL loading: {problems}")
        return 1

    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long), use_cache=False)
    got = out.logits.float().numpy()

    print(f"model: {type(model).__name__} ({model.config.model_type}), tokens {tuple(tokens.shape)}")
    if got.shape != want.shape:
        print(f"FAIL shape: ours {got.shape} vs golden {want.shape}")
        return 1
    if not np.isfinite(got).all():
        print("FAIL: non-finite logits")
        return 1

    diff = np.abs(got - want)
    max_diff = float(diff.max())
    lp_gold, lp_ours = log_softmax(want), log_softmax(got)
    kl = (np.exp(lp_gold) * (lp_gold - lp_ours)).sum(axis=-1)  # [B, S]
    argmax_agree = float((got.argmax(-1) == want.argmax(-1)).mean())
    where = np.unravel_index(int(diff.argmax()), diff.shape)

    print(f"max |logit diff|        : {max_diff:.3e}  at (batch, pos, vocab) = {tuple(int(i) for i in where)}")
    print(f"mean KL(golden || ours) : {float(kl.mean()):.3e}  (max over tokens {float(kl.max()):.3e})")
    print(f"argmax agreement        : {argmax_agree:.4f}")
    ok = max_diff <= args.atol
    print(f"{'PASS' if ok else 'FAIL'} (atol {args.atol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
