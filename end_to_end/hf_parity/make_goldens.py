"""Make the Hugging Face reference fixtures for tunix_core's checkpoint parity tests.

Run from the repository root, in a SEPARATE environment that has torch and transformers
(they are never a dependency of tunix_core itself):

    /tmp/hfenv/bin/python end_to_end/hf_parity/make_goldens.py

For every case it builds a tiny random model with transformers' own config and model
classes (float32, eager attention), re-initialises every parameter from a fixed seed at a
scale where the family's features visibly matter, saves it with ``save_pretrained``
(safetensors) into ``checkpoints/<case>/`` and writes ``goldens/<case>.npz`` with

    tokens  int32   [2, 40]        random ids in [0, vocab)
    logits  float32 [2, 40, vocab] HF forward pass, no attention mask (plain causal),
                                   positions 0..39

It then proves the fixtures: every checkpoint is reloaded with AutoModelForCausalLM and must
reproduce the golden bit for bit (max abs diff 0) with no missing/unexpected keys; each
family feature is switched off in turn and must change the logits (sensitivity); the
Gemma 2 soft-caps must bind. Everything is deterministic (fixed torch generators, fixed
parameter order); the script is idempotent and rewrites the fixture directories.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

HERE = Path(__file__).resolve().parent
CKPT_DIR = HERE / "checkpoints"
GOLDEN_DIR = HERE / "goldens"

BATCH, SEQ = 2, 40
TOKEN_SEED = 20240601

# Init scales (std of a zero-mean normal) for every parameter kind.
STD_MATRIX = 0.15
STD_NORM = 0.5  # Llama-style x*w and Gemma-style x*(1+w) differ clearly at this scale
STD_BIAS = 0.3
STD_EMBED = 1.0

COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    max_position_embeddings=128,
    attn_implementation="eager",
)

# Gemma 2 soft-caps. The real model uses 50 (attention) / 30 (final); with these tiny random
# weights those would never bind. Here the pre-cap attention scores have median |s| ~0.9 and
# max ~7, and the pre-cap final logits median ~6 and max ~79, so 2.0 / 10.0 bind clearly
# (roughly 10% / 25% of entries beyond the cap, the largest 3.5x / 8x past it) while most
# entries stay in tanh's sensitive range (a cap of 3.0 on the logits would saturate ~75%).
# check_gemma2_softcaps() asserts this.
GEMMA2_ATTN_SOFTCAP = 2.0
GEMMA2_FINAL_SOFTCAP = 10.0

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # 64 (not Llama 3's 8192) so that, with head_dim 16 and theta 5e5, the 8 rotary
    # frequencies fall in all three llama3 bands: wavelength 2*pi (< 64/4 = 16: unchanged),
    # 32.5 (between 16 and 64: smoothed), >= 168 (> 64: divided by 8).
    "original_max_position_embeddings": 64,
}

CASES = {
    "llama3": dict(
        seed=1001,
        config_cls=LlamaConfig,
        model_cls=LlamaForCausalLM,
        kwargs=dict(
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rope_parameters=dict(LLAMA3_ROPE),
            tie_word_embeddings=False,
        ),
        max_shard_size="200KB",  # sharded: >= 2 files + model.safetensors.index.json
        ablations={
            "llama3 rope scaling -> default rope": dict(
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0}
            ),
        },
    ),
    "llama3_tied": dict(
        seed=1002,
        config_cls=LlamaConfig,
        model_cls=LlamaForCausalLM,
        kwargs=dict(
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rope_parameters=dict(LLAMA3_ROPE),
            tie_word_embeddings=True,
        ),
        ablations={
            "llama3 rope scaling -> default rope": dict(
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0}
            ),
        },
    ),
    "qwen2": dict(
        seed=1003,
        config_cls=Qwen2Config,
        model_cls=Qwen2ForCausalLM,
        kwargs=dict(
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            use_sliding_window=False,
            tie_word_embeddings=True,
        ),
        ablations={
            "rope_theta 1e6 -> 1e4": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        },
    ),
    "qwen3": dict(
        seed=1004,
        config_cls=Qwen3Config,
        model_cls=Qwen3ForCausalLM,
        kwargs=dict(
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,  # != hidden/heads = 16
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            use_sliding_window=False,
            tie_word_embeddings=False,
        ),
        ablations={
            "rope_theta 1e6 -> 1e4": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        },
    ),
    "gemma": dict(
        seed=1005,
        config_cls=GemmaConfig,
        model_cls=GemmaForCausalLM,
        kwargs=dict(
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,  # multi-query
            head_dim=32,
            hidden_act="gelu_pytorch_tanh",  # GemmaConfig's field is hidden_act (Gemma 2/3: hidden_activation)
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=True,
        ),
        ablations={
            "gelu_pytorch_tanh -> exact gelu": dict(hidden_act="gelu_python"),
            "rope_theta 1e4 -> 1e6": dict(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        },
    ),
    "gemma2": dict(
        seed=1006,
        config_cls=Gemma2Config,
        model_cls=Gemma2ForCausalLM,
        kwargs=dict(
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            hidden_activation="gelu_pytorch_tanh",
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            query_pre_attn_scalar=24,  # != head_dim
            attn_logit_softcapping=GEMMA2_ATTN_SOFTCAP,
            final_logit_softcapping=GEMMA2_FINAL_SOFTCAP,
            tie_word_embeddings=True,
        ),
        ablations={
            "sliding window off": dict(sliding_window=SEQ * 4),
            "sliding window 8 -> 9": dict(sliding_window=9),
            "attn softcap off": dict(attn_logit_softcapping=None),
            "final softcap off": dict(final_logit_softcapping=None),
            "query_pre_attn_scalar 24 -> head_dim 16": dict(query_pre_attn_scalar=16),
        },
    ),
    "gemma3": dict(
        seed=1007,
        config_cls=Gemma3TextConfig,
        model_cls=Gemma3ForCausalLM,
        kwargs=dict(
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            hidden_activation="gelu_pytorch_tanh",
            sliding_window=8,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=24,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            },
            tie_word_embeddings=True,
        ),
        ablations={
            "sliding window off": dict(sliding_window=SEQ * 4),
            "sliding window 8 -> 9": dict(sliding_window=9),
            "global linear rope scaling off": dict(
                rope_parameters={
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                    "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                }
            ),
            "local rope theta 1e4 -> 1e6": dict(
                rope_parameters={
                    "sliding_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                }
            ),
            "query_pre_attn_scalar 24 -> head_dim 16": dict(query_pre_attn_scalar=16),
        },
    ),
}

# Every fixture must move by at least this much (10x the parity tolerance) when one of its
# features is switched off.
MIN_ABLATION_DIFF = 1e-3


def build_config(case: dict, overrides: dict | None = None):
    kwargs = copy.deepcopy({**COMMON, **case["kwargs"]})
    kwargs.update(copy.deepcopy(overrides or {}))
    return case["config_cls"](**kwargs)


def param_std(name: str) -> float:
    if "embed_tokens" in name or name == "lm_head.weight":
        return STD_EMBED
    if name.endswith(".bias"):
        return STD_BIAS
    if "norm" in name:  # input/post_attention/pre_/post_feedforward layernorm, final norm, q_norm, k_norm
        return STD_NORM
    return STD_MATRIX


@torch.no_grad()
def reinit_(model: torch.nn.Module, seed: int) -> dict[str, float]:
    """Overwrite every parameter (in sorted-name order) from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    stds = {}
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        std = param_std(name)
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
        stds[name] = std
    return stds


@torch.no_grad()
def forward_logits(model, tokens: torch.Tensor) -> np.ndarray:
    out = model(input_ids=tokens, use_cache=False)
    return out.logits.float().numpy()


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class Gemma2ScoreProbe:
    """Records pre-soft-cap attention scores of Gemma 2's eager attention (unmasked entries)."""

    def __init__(self):
        from transformers.models.gemma2 import modeling_gemma2

        self.mod = modeling_gemma2
        self.orig = modeling_gemma2.eager_attention_forward
        self.scores: list[torch.Tensor] = []

    def __enter__(self):
        orig, mod, scores = self.orig, self.mod, self.scores

        def probe(module, query, key, value, attention_mask, scaling=None, **kw):
            k = mod.repeat_kv(key, module.num_key_value_groups)
            s = torch.matmul(query, k.transpose(2, 3)) * (scaling if scaling is not None else module.head_dim**-0.5)
            allowed = (attention_mask == 0).expand_as(s) if attention_mask is not None else torch.ones_like(s, dtype=bool)
            scores.append(s[allowed].detach().flatten())
            return orig(module, query, key, value, attention_mask, scaling=scaling, **kw)

        mod.eager_attention_forward = probe
        return self

    def __exit__(self, *exc):
        self.mod.eager_attention_forward = self.orig


def check_gemma2_softcaps(model, tokens) -> dict:
    with Gemma2ScoreProbe() as probe, torch.no_grad():
        model(input_ids=tokens, use_cache=False)
    with torch.no_grad():
        hidden = model.model(input_ids=tokens, use_cache=False).last_hidden_state
        raw_logits = model.lm_head(hidden)
    scores = torch.cat(probe.scores).abs()
    raw_logits = raw_logits.abs()
    stats = dict(
        attn_max=float(scores.max()),
        attn_frac_over=float((scores > GEMMA2_ATTN_SOFTCAP).float().mean()),
        final_max=float(raw_logits.max()),
        final_frac_over=float((raw_logits > GEMMA2_FINAL_SOFTCAP).float().mean()),
    )
    # "Clearly binds": scores well past the cap exist, yet most are in tanh's sensitive range.
    assert stats["attn_max"] > 2 * GEMMA2_ATTN_SOFTCAP, stats
    assert stats["final_max"] > 2 * GEMMA2_FINAL_SOFTCAP, stats
    assert 0.01 < stats["attn_frac_over"] < 0.9, stats
    assert 0.01 < stats["final_frac_over"] < 0.9, stats
    return stats


def check_config_json(name: str, cfg: dict) -> None:
    if name.startswith("llama3"):
        rp = cfg["rope_parameters"]
        assert rp["rope_type"] == "llama3" and rp["factor"] == 8.0, rp
    if name == "gemma3":
        rp = cfg["rope_parameters"]
        assert set(rp) == {"sliding_attention", "full_attention"}, rp
        assert rp["full_attention"]["rope_type"] == "linear" and rp["full_attention"]["factor"] == 8.0, rp
        assert rp["full_attention"]["rope_theta"] == 1e6 and rp["sliding_attention"]["rope_theta"] == 1e4, rp
        assert set(cfg["layer_types"]) == {"sliding_attention", "full_attention"}, cfg["layer_types"]


def make_case(name: str, case: dict, tokens: torch.Tensor) -> dict:
    torch.manual_seed(case["seed"])
    config = build_config(case)
    model = case["model_cls"](config).eval()
    assert model.config._attn_implementation == "eager", model.config._attn_implementation
    reinit_(model, case["seed"])
    if config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        assert model.lm_head.weight is not model.model.embed_tokens.weight

    logits = forward_logits(model, tokens)
    assert logits.shape == (BATCH, SEQ, config.vocab_size) and np.isfinite(logits).all()

    out_dir = CKPT_DIR / name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    save_kwargs = {}
    if case.get("max_shard_size"):
        save_kwargs["max_shard_size"] = case["max_shard_size"]
    model.save_pretrained(out_dir, **save_kwargs)
    gen_cfg = out_dir / "generation_config.json"
    if gen_cfg.exists():  # only bos/eos/pad ids copied from the config: noise for these fixtures
        gen_cfg.unlink()
    files = sorted(p.name for p in out_dir.iterdir())
    st_files = [f for f in files if f.endswith(".safetensors")]
    if case.get("max_shard_size"):
        assert len(st_files) >= 2 and "model.safetensors.index.json" in files, files
    else:
        assert st_files == ["model.safetensors"], files

    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    golden_path = GOLDEN_DIR / f"{name}.npz"
    np.savez(golden_path, tokens=tokens.numpy().astype(np.int32), logits=logits.astype(np.float32))

    # Reload from disk: the files alone must reproduce the golden exactly.
    reloaded, info = AutoModelForCausalLM.from_pretrained(
        out_dir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    reloaded.eval()
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(key), (name, key, info.get(key))
    assert type(reloaded) is case["model_cls"], type(reloaded)
    reload_diff = float(np.abs(forward_logits(reloaded, tokens) - logits).max())
    assert reload_diff == 0.0, (name, reload_diff)

    saved_cfg = json.loads((out_dir / "config.json").read_text())
    check_config_json(name, saved_cfg)

    # Sensitivity: switching each feature off must move the logits.
    state = model.state_dict()
    ablations = {}
    for what, overrides in case.get("ablations", {}).items():
        alt = case["model_cls"](build_config(case, overrides)).eval()
        alt.load_state_dict(state, strict=True)
        d = float(np.abs(forward_logits(alt, tokens) - logits).max())
        ablations[what] = d
        assert d > MIN_ABLATION_DIFF, (name, what, d)

    extra = {}
    if name == "gemma2":
        extra["softcap"] = check_gemma2_softcaps(model, tokens)
    if name.startswith("llama3"):
        default = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float) / 16))
        inv = model.model.rotary_emb.inv_freq
        extra["llama3_inv_freq_ratio"] = [round(float(r), 4) for r in (inv / default)]

    return dict(
        name=name,
        files=len(files),
        size=dir_size(out_dir),
        golden_size=golden_path.stat().st_size,
        max_logit=float(np.abs(logits).max()),
        reload_diff=reload_diff,
        ablations=ablations,
        extra=extra,
    )


def main() -> int:
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)  # one fixed reduction order
    torch.use_deterministic_algorithms(True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, numpy {np.__version__}")
    tokens = torch.randint(0, COMMON["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(TOKEN_SEED))
    rows = [make_case(name, case, tokens) for name, case in CASES.items()]

    print()
    print(f"{'case':<12} {'files':>5} {'ckpt bytes':>10} {'golden bytes':>12} {'max|logit|':>10} {'reload diff':>11}")
    for r in rows:
        print(
            f"{r['name']:<12} {r['files']:>5} {r['size']:>10} {r['golden_size']:>12} "
            f"{r['max_logit']:>10.3f} {r['reload_diff']:>11.1g}"
        )
    print()
    print("sensitivity (max |logit diff| with one feature switched off):")
    for r in rows:
        for what, d in r["ablations"].items():
            print(f"  {r['name']:<12} {what:<42} {d:.3f}")
    for r in rows:
        for k, v in r["extra"].items():
            print(f"  {r['name']:<12} {k}: {v}")
    total = dir_size(CKPT_DIR) + dir_size(GOLDEN_DIR)
    print(f"\ntotal fixture bytes: {total} ({total / 2**20:.2f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
