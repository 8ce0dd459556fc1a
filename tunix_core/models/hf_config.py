"""Hugging Face config.json <-> our config keys, for every family.

Reads both the transformers-5 layout (`rope_parameters`, per layer type for Gemma 3, `layer_types`) and
the older one found in many Hub checkpoints (`rope_theta`, `rope_scaling`, `rope_local_base_freq`,
`sliding_window_pattern`). Writes the transformers-5 layout.
"""

import json
import os
from typing import Any

from tunix_core.errors import UserError

# model_type -> (decoder_block, architecture written on export)
MODEL_TYPES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma": ("gemma", "GemmaForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
    "gemma3_text": ("gemma3", "Gemma3ForCausalLM"),
}
# model_type -> the architecture a reward model (value_head.ValueModel) is written as: one score per sequence.
SEQUENCE_CLASSIFICATION = {
    "llama": "LlamaForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "qwen3": "Qwen3ForSequenceClassification",
    "gemma": "GemmaForSequenceClassification",
    "gemma2": "Gemma2ForSequenceClassification",
    "gemma3_text": "Gemma3TextForSequenceClassification",
}
EXPORT_MODEL_TYPE = {block: model_type for model_type, (block, _) in MODEL_TYPES.items()}
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "gelu": "gelu", "relu": "relu"}
HF_ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "relu": "relu"}
# transformers' defaults for keys a config.json may leave out.
TIED_BY_DEFAULT = {"llama": False, "qwen2": False, "qwen3": False, "gemma": True, "gemma2": True, "gemma3": True}
SLIDING_PATTERN_BY_DEFAULT = {"gemma2": 2, "gemma3": 6}


def resolve(path: str) -> str:
  """A local model directory as given, or a Hub model id ("org/name") downloaded with huggingface_hub."""
  if os.path.isdir(path):
    return path
  if path.count("/") != 1 or os.path.exists(path) or path.startswith((".", "/")):
    raise UserError(f"hf_path={path}: no such directory; expected a Hugging Face model directory or a Hub id")
  try:
    import huggingface_hub  # pylint: disable=import-outside-toplevel
    return huggingface_hub.snapshot_download(
        path, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja"])
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"hf_path={path}: not a local directory, and downloading it from the Hub failed "
                    f"({type(e).__name__}); download it yourself and pass the directory") from None


def read_config_json(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise UserError(f"hf_path={directory}: no config.json; expected a Hugging Face model directory")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise UserError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None


def _rope(hf: dict[str, Any], block: str) -> dict[str, Any]:
  params = hf.get("rope_parameters")
  if params and "full_attention" in params:          # transformers 5, per layer type (Gemma 3)
    full, local = params["full_attention"], params.get("sliding_attention")
  elif params:
    full, local = params, None
  else:                                               # older config.json
    full = dict(hf.get("rope_scaling") or {})
    full["rope_theta"] = hf.get("rope_theta", 10000.0)
    local = {"rope_theta": hf["rope_local_base_freq"]} if "rope_local_base_freq" in hf else None
  rope_type = full.get("rope_type", full.get("type", "default"))
  if rope_type not in ("default", "linear", "llama3"):
    raise UserError(f"config.json rope type {rope_type!r} is not supported; supported: default, linear, llama3")
  keys = {"rope_max_timescale": float(full.get("rope_theta", 10000.0)), "rope_type": rope_type,
          "rope_factor": float(full.get("factor", 1.0))}
  if rope_type == "llama3":
    keys.update(rope_low_freq_factor=float(full["low_freq_factor"]), rope_high_freq_factor=float(full["high_freq_factor"]),
                rope_original_max_position=int(full["original_max_position_embeddings"]))
  if local is not None and block == "gemma3":
    if local.get("rope_type", "default") != "default":
      raise UserError("config.json: scaled rope on sliding-window layers is not supported")
    keys["local_rope_max_timescale"] = float(local["rope_theta"])
  return keys


def _layer_types(hf: dict[str, Any], block: str, num_layers: int) -> list[str]:
  if hf.get("layer_types"):
    return list(hf["layer_types"])
  pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", SLIDING_PATTERN_BY_DEFAULT.get(block)))
  if not pattern or not hf.get("sliding_window"):
    return []
  return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]


def config_keys(directory: str) -> dict[str, Any]:
  """Our architecture keys for the model in a Hugging Face directory."""
  hf = read_config_json(directory)
  model_type = hf.get("model_type")
  if model_type == "gemma3" and "text_config" in hf:
    raise UserError(f"hf_path={directory} is a Gemma 3 vision-language checkpoint; use a text-only one "
                    f"(model_type gemma3_text, Gemma3ForCausalLM)")
  if model_type not in MODEL_TYPES:
    raise UserError(f"hf_path={directory}: model_type {model_type!r} is not supported; supported: "
                    f"{', '.join(MODEL_TYPES)}")
  block = MODEL_TYPES[model_type][0]
  if hf.get("use_sliding_window"):
    raise UserError(f"hf_path={directory}: use_sliding_window=true (Qwen sliding attention) is not supported")
  act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
  if block == "gemma" and act == "gelu":
    act = "gelu_pytorch_tanh"  # legacy Gemma configs say "gelu" but mean the tanh approximation (as transformers does)
  if act not in ACTIVATIONS:
    raise UserError(f"hf_path={directory}: activation {act!r} is not supported")
  num_layers = int(hf["num_hidden_layers"])
  layer_types = _layer_types(hf, block, num_layers)
  if "sliding_attention" not in layer_types:
    layer_types = []  # Qwen configs list full_attention for every layer: the same as no list
  keys = {
      "decoder_block": block,
      "vocab_size": int(hf["vocab_size"]),
      "base_emb_dim": int(hf["hidden_size"]),
      "base_num_query_heads": int(hf["num_attention_heads"]),
      "base_num_kv_heads": int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
      "head_dim": int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]),
      "base_mlp_dim": int(hf["intermediate_size"]),
      "base_num_decoder_layers": num_layers,
      "mlp_activations": [ACTIVATIONS[act], "linear"],
      "normalization_layer_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
      "logits_via_embedding": bool(hf.get("tie_word_embeddings", TIED_BY_DEFAULT[block])),
      "layer_types": layer_types,
      "sliding_window_size": int(hf.get("sliding_window") or 0) if "sliding_attention" in layer_types else 0,
      # transformers' Gemma 3 ignores attn_logit_softcapping even when a config.json sets it.
      "attn_logits_soft_cap": 0.0 if block == "gemma3" else float(hf.get("attn_logit_softcapping") or 0.0),
      "final_logits_soft_cap": float(hf.get("final_logit_softcapping") or 0.0),
      "query_pre_attn_scalar": float(hf.get("query_pre_attn_scalar") or 0.0),
      **_rope(hf, block),
  }
  return keys


def to_config_json(config, token_ids: dict[str, int | None], sequence_classification: bool = False
                   ) -> dict[str, Any]:
  """config.json in transformers-5 form for the configured model; token_ids: bos/eos/pad ids or None.
  sequence_classification: a reward model, one label (a scalar score per sequence)."""
  block = config.decoder_block
  model_type = EXPORT_MODEL_TYPE[block]
  full = {"rope_type": config.rope_type, "rope_theta": config.rope_max_timescale}
  if config.rope_type in ("linear", "llama3"):
    full["factor"] = config.rope_factor
  if config.rope_type == "llama3":
    full.update(low_freq_factor=config.rope_low_freq_factor, high_freq_factor=config.rope_high_freq_factor,
                original_max_position_embeddings=config.rope_original_max_position)
  rope = full
  if block == "gemma3":
    local_theta = config.local_rope_max_timescale or config.rope_max_timescale
    rope = {"full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}}
  layer_types = [config.layer_types[i % len(config.layer_types)] if config.layer_types else "full_attention"
                 for i in range(config.base_num_decoder_layers)]
  act_key = "hidden_activation" if block in ("gemma2", "gemma3") else "hidden_act"
  hf = {
      "architectures": [MODEL_TYPES[model_type][1]],
      "model_type": model_type,
      "vocab_size": config.vocab_size,
      "hidden_size": config.base_emb_dim,
      "intermediate_size": config.base_mlp_dim,
      "num_hidden_layers": config.base_num_decoder_layers,
      "num_attention_heads": config.base_num_query_heads,
      "num_key_value_heads": config.base_num_kv_heads,
      "head_dim": config.head_dim,
      act_key: HF_ACTIVATIONS[config.mlp_activations[0]],
      "rms_norm_eps": config.normalization_layer_epsilon,
      "tie_word_embeddings": config.logits_via_embedding,
      "rope_parameters": rope,
      "max_position_embeddings": max(config.max_target_length, config.rope_original_max_position),
      "bos_token_id": token_ids.get("bos"),
      "eos_token_id": token_ids.get("eos"),
      "pad_token_id": token_ids.get("pad"),
      "dtype": config.weight_dtype,
  }
  if sequence_classification:
    hf.update(architectures=[SEQUENCE_CLASSIFICATION[model_type]], id2label={"0": "LABEL_0"},
              label2id={"LABEL_0": 0})
  if block == "qwen2":
    hf["use_sliding_window"] = False
  if block in ("gemma2", "gemma3"):
    hf.update(layer_types=layer_types, sliding_window=config.sliding_window_size or None,
              # transformers validates this field as an int.
              query_pre_attn_scalar=int(config.query_pre_attn_scalar or config.head_dim),
              attn_logit_softcapping=config.attn_logits_soft_cap or None,
              final_logit_softcapping=config.final_logits_soft_cap or None)
  return hf
