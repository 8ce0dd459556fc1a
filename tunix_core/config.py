"""The one place that reads YAML and argv: layering, typing, validation, derived values, freezing.

Layers, later winning: configs/base.yml <- configs/models/<model_name>.yml <- the YAML named on the
command line <- key=value overrides. Every key must exist in base.yml; its default fixes its type.
"""

from collections.abc import Sequence
import difflib
import math
import os
from pathlib import Path
from typing import Any

import ml_collections
import yaml

from tunix_core import distributed, sharding
from tunix_core.errors import UserError
from tunix_core.models import hf_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
BASE_CONFIG = CONFIG_DIR / "base.yml"

CHOICES = {
    "mode": ("sft", "dpo", "orpo", "simpo", "rm", "grpo", "ppo", "distill"),
    "peft": ("none", "lora", "qlora"),
    "qlora_dtype": ("nf4", "int4", "int8"),
    "dpo_loss": ("sigmoid", "ipo", "hinge", "robust"),
    "distill_divergence": ("forward", "reverse", "jsd"),
    "teacher_dtype": ("float32", "bfloat16"),
    "decoder_block": ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"),
    "rope_type": ("default", "linear", "llama3"),
    "remat_policy": ("none", "full", "minimal", "save_qkv_proj", "save_out_proj", "save_dot_except_mlp"),
    "attention": ("auto", "xla", "flash", "cudnn"),
    "dtype": ("float32", "bfloat16", "float16"),
    "weight_dtype": ("float32", "bfloat16"),
    "dataset_type": ("jsonl", "parquet", "tfds"),
    "long_examples": ("truncate", "drop"),
    "opt_type": ("adamw", "adam", "sgd", "adafactor"),
    "learning_rate_schedule": ("cosine", "linear", "constant"),
    "loss_algo": ("grpo", "gspo_token", "dr_grpo", "dapo"),
    "kl_estimator": ("k1", "k2", "k3"),
    "scale_rewards": ("auto", "group", "batch", "none"),
    "loss_aggregation": ("auto", "token-mean", "sequence-mean-token-mean", "sequence-mean-token-sum",
                         "sequence-mean-token-sum-norm"),
    "dynamic_sampling": ("auto", "on", "off"),
}
RL_MODES = ("grpo", "ppo")
# What loss_algo sets when a key says "auto" (and epsilon_high 0): (scale_rewards, loss_aggregation, dynamic sampling).
ALGO_DEFAULTS = {"grpo": ("group", "sequence-mean-token-mean", "off"),
                 "gspo_token": ("group", "sequence-mean-token-mean", "off"),
                 "dr_grpo": ("none", "sequence-mean-token-sum-norm", "off"),
                 "dapo": ("group", "token-mean", "on")}
DAPO_EPSILON_HIGH = 0.28
ACTIVATION_CHOICES = ("silu", "gelu", "gelu_tanh", "relu", "linear")
POSITIVE = ("lora_rank", "qlora_tile_size", "dpo_beta", "steps", "vocab_size", "base_emb_dim", "base_num_query_heads", "base_num_kv_heads", "head_dim",
            "base_mlp_dim", "base_num_decoder_layers", "gradient_accumulation_steps", "checkpoint_period",
            "max_num_checkpoints_to_keep", "log_period", "per_device_batch_size", "normalization_layer_epsilon",
            "rope_max_timescale", "stack_trace_interval_seconds", "max_new_tokens", "num_samples", "beam_width",
            "generate_batch_size", "generate_threads", "num_generations", "num_iterations", "max_sampling_rounds")
NON_NEGATIVE = ("eval_interval", "loss_chunk_size", "sample_max_new_tokens", "learning_rate", "adam_eps",
                "adam_weight_decay", "gradient_clipping_threshold", "init_weights_std", "seed", "rope_factor",
                "local_rope_max_timescale", "sliding_window_size", "attn_logits_soft_cap", "final_logits_soft_cap",
                "query_pre_attn_scalar", "lora_alpha", "orpo_lambda", "simpo_beta", "simpo_gamma",
                "temperature", "top_k", "rm_margin", "rm_center_rewards_coefficient", "rollout_batch_size",
                "dynamic_sampling_prompts", "beta", "decode_halvings", "epsilon", "epsilon_high", "dual_clip_c",
                "reward_timeout_s", "overlong_buffer_tokens", "distill_top_k", "cliprange_value", "vf_coef",
                "entropy_coef")
LAYER_TYPES = ("sliding_attention", "full_attention")
FRACTIONS = ("distill_alpha", "top_p", "min_p", "dpo_label_smoothing", "warmup_steps_fraction",
             "cosine_learning_rate_final_fraction", "adam_b1", "adam_b2", "gamma", "lam")
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "1"), ("false", "no", "0")
DISTILL_STRATEGIES = ("logit", "attention_transfer", "feature_pooling", "feature_projection")
# Keys that fix a decoder's architecture and parameter layout: what a distillation teacher takes from its sources.
ARCHITECTURE_KEYS = ("decoder_block", "vocab_size", "base_emb_dim", "base_num_query_heads", "base_num_kv_heads",
                     "head_dim", "base_mlp_dim", "base_num_decoder_layers", "mlp_activations",
                     "normalization_layer_epsilon", "rope_max_timescale", "rope_type", "rope_factor",
                     "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_position",
                     "local_rope_max_timescale", "sliding_window_size", "layer_types", "attn_logits_soft_cap",
                     "final_logits_soft_cap", "query_pre_attn_scalar", "logits_via_embedding", "scan_layers")
TEACHER_ARCHITECTURE = "teacher_architecture"  # derived: the teacher's ARCHITECTURE_KEYS (mode=distill)


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
  if not path.is_file():
    raise UserError(f"{what} {path}: no such file")
  try:
    data = yaml.safe_load(path.read_text())
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    where = f" line {mark.line + 1}" if mark else ""
    raise UserError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
  if data is None:
    return {}
  if not isinstance(data, dict):
    raise UserError(f"{path}: expected a mapping of key: value, got {type(data).__name__}")
  return data


def _unknown_key(key: str, known: Sequence[str], source: str) -> UserError:
  close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
  hint = f"; did you mean {', '.join(close)}?" if close else "; every key is listed in configs/base.yml"
  return UserError(f"unknown config key {key!r} (from {source}){hint}")


def _coerce(key: str, value: Any, default: Any, source: str) -> Any:
  """Converts `value` to the type of base.yml's default, or raises a UserError naming key and type."""
  from_text = isinstance(value, str)
  if default is None:  # a number or null (reward_error_default)
    if value is None or (from_text and value.strip().lower() in ("null", "none", "")):
      return None
    default = 0.0
  try:
    if isinstance(default, bool):
      if isinstance(value, bool):
        return value
      if from_text and value.lower() in TRUE_WORDS + FALSE_WORDS:
        return value.lower() in TRUE_WORDS
      raise ValueError
    if isinstance(default, int):
      if isinstance(value, bool):
        raise ValueError
      if isinstance(value, int):
        return value
      if from_text:
        return int(value)
      raise ValueError
    if isinstance(default, float):
      if isinstance(value, bool):
        raise ValueError
      return float(value)
    if isinstance(default, list):
      parsed = yaml.safe_load(value) if from_text else value
      if not isinstance(parsed, list):
        raise ValueError
      return parsed
    if isinstance(default, str):
      if isinstance(value, (dict, list)):
        raise ValueError
      return str(value)
  except (ValueError, TypeError, yaml.YAMLError):
    pass
  expected = {bool: "true or false", int: "an integer", float: "a number or null" if key == "reward_error_default"
              else "a number", list: "a list like [a, b]", str: "a string"}[type(default)]
  raise UserError(f"{key}={value!r} (from {source}): expected {expected}")


def _parse_overrides(args: Sequence[str]) -> dict[str, str]:
  overrides = {}
  for arg in args:
    key, sep, value = arg.partition("=")
    if not sep or not key:
      raise UserError(f"argument {arg!r}: expected key=value (a config file may only come first)")
    overrides[key.strip()] = value
  return overrides


def layer(argv: Sequence[str]) -> dict[str, Any]:
  """Merges base.yml, the model file, the named YAML and key=value overrides into one typed dict."""
  args = list(argv)
  named = Path(args.pop(0)) if args and "=" not in args[0] else BASE_CONFIG
  overrides = _parse_overrides(args)
  base = _read_yaml(BASE_CONFIG, "base config")
  recipe = {} if named.resolve() == BASE_CONFIG else _read_yaml(named, "config file")
  model_name = overrides.get("model_name", recipe.get("model_name", base["model_name"]))
  model = {}
  if model_name:
    model_file = CONFIG_DIR / "models" / f"{model_name}.yml"
    if not model_file.is_file():
      available = sorted(p.stem for p in (CONFIG_DIR / "models").glob("*.yml"))
      raise UserError(f"model_name={model_name!r}: no {model_file}; available: {', '.join(available) or 'none'}")
    model = _read_yaml(model_file, "model config")

  merged = dict(base)
  for source, values in ((str(model_file) if model else "", model), (str(named), recipe), ("command line", overrides)):
    for key, value in values.items():
      if key not in base:
        raise _unknown_key(key, list(base), source)
      merged[key] = _coerce(key, value, base[key], source)
  if merged["mode"] == "distill":
    merged[TEACHER_ARCHITECTURE] = teacher_architecture(merged, base)
  if merged["hf_path"]:
    # The checkpoint's own config.json fixes the architecture; its tokenizer is the default one.
    merged["hf_path"] = hf_config.resolve(merged["hf_path"])
    source = os.path.join(merged["hf_path"], "config.json")
    for key, value in hf_config.config_keys(merged["hf_path"]).items():
      merged[key] = _coerce(key, value, base[key], source)
    if not any("tokenizer_path" in values for values in (model, recipe, overrides)):
      merged["tokenizer_path"] = merged["hf_path"]
  return merged


def validate(cfg: dict[str, Any]) -> None:
  """Checks values that do not depend on the devices; raises a UserError naming the key."""
  for key, allowed in CHOICES.items():
    if cfg[key] not in allowed:
      raise UserError(f"{key}={cfg[key]!r}: expected one of {', '.join(allowed)}")
  for key in POSITIVE:
    if cfg[key] <= 0:
      raise UserError(f"{key}={cfg[key]}: must be positive")
  for key in NON_NEGATIVE:
    if cfg[key] < 0:
      raise UserError(f"{key}={cfg[key]}: must be >= 0")
  for key in FRACTIONS:
    if not 0.0 <= cfg[key] <= 1.0:
      raise UserError(f"{key}={cfg[key]}: must be between 0 and 1")
  acts = cfg["mlp_activations"]
  if len(acts) != 2 or any(a not in ACTIVATION_CHOICES for a in acts):
    raise UserError(f"mlp_activations={acts}: expected two of {', '.join(ACTIVATION_CHOICES)} (gate, up)")
  if cfg["base_num_query_heads"] % cfg["base_num_kv_heads"]:
    raise UserError(f"base_num_kv_heads={cfg['base_num_kv_heads']} must divide "
                    f"base_num_query_heads={cfg['base_num_query_heads']}")
  if cfg["head_dim"] % 2:
    raise UserError(f"head_dim={cfg['head_dim']}: rotary embeddings need an even head_dim")
  bad_types = [t for t in cfg["layer_types"] if t not in LAYER_TYPES]
  if bad_types:
    raise UserError(f"layer_types: {bad_types} are not among {', '.join(LAYER_TYPES)}")
  if "sliding_attention" in cfg["layer_types"] and cfg["sliding_window_size"] <= 0:
    raise UserError("layer_types has sliding_attention layers but sliding_window_size=0; set the window")
  if cfg["layer_types"] and cfg["decoder_block"] not in ("gemma2", "gemma3"):
    raise UserError(f"layer_types is a Gemma 2/3 feature; decoder_block={cfg['decoder_block']} has only full attention")
  gemma_2_3 = cfg["decoder_block"] in ("gemma2", "gemma3")
  for key in ("attn_logits_soft_cap", "final_logits_soft_cap", "query_pre_attn_scalar", "sliding_window_size"):
    if cfg[key] and not gemma_2_3:
      raise UserError(f"{key}={cfg[key]} is a Gemma 2/3 feature; set decoder_block=gemma2 or gemma3, or {key}=0")
  if not 0.0 <= cfg["ema_decay"] < 1.0:
    raise UserError(f"ema_decay={cfg['ema_decay']}: must be at least 0 (0 = off) and below 1")
  if cfg["dpo_label_smoothing"] >= 0.5:
    raise UserError(f"dpo_label_smoothing={cfg['dpo_label_smoothing']}: must be below 0.5 (a flipped label)")
  if cfg["precompute_reference"] and (cfg["mode"] != "dpo" or cfg["peft"] != "none"):
    raise UserError(f"precompute_reference=true replaces DPO's frozen reference copy in full fine-tuning; with "
                    f"mode={cfg['mode']} peft={cfg['peft']} there is none to replace (LoRA/QLoRA's reference is the "
                    "base with adapters off); set precompute_reference=false")
  _validate_reward_model(cfg)
  if cfg["attention"] == "cudnn" and cfg["attn_logits_soft_cap"]:
    raise UserError("attention=cudnn cannot soft-cap attention logits (attn_logits_soft_cap); use flash or xla")
  if not float(cfg["query_pre_attn_scalar"]).is_integer():
    raise UserError(f"query_pre_attn_scalar={cfg['query_pre_attn_scalar']}: expected a whole number")
  if cfg["local_rope_max_timescale"] and cfg["decoder_block"] != "gemma3":
    raise UserError("local_rope_max_timescale is a Gemma 3 feature; set decoder_block=gemma3 or leave it 0")
  if cfg["export_hf_path"] and os.path.isdir(cfg["export_hf_path"]) and os.listdir(cfg["export_hf_path"]):
    raise UserError(f"export_hf_path={cfg['export_hf_path']} exists and is not empty; choose a new directory")
  if cfg["rope_type"] == "llama3" and cfg["rope_high_freq_factor"] <= cfg["rope_low_freq_factor"]:
    raise UserError(f"rope_type=llama3 needs rope_high_freq_factor ({cfg['rope_high_freq_factor']}) > "
                    f"rope_low_freq_factor ({cfg['rope_low_freq_factor']})")
  if cfg["max_target_length"] < 2:
    raise UserError(f"max_target_length={cfg['max_target_length']}: must be at least 2")
  if cfg["eval_steps"] == 0 or cfg["eval_steps"] < -1:
    raise UserError(f"eval_steps={cfg['eval_steps']}: expected a positive number of batches, or -1 for all")
  if not cfg["run_name"] or "/" in cfg["run_name"]:
    raise UserError(f"run_name={cfg['run_name']!r}: expected a non-empty name without '/'")
  if cfg["dataset_type"] == "tfds" and not cfg["dataset_name"]:
    raise UserError("dataset_type=tfds needs dataset_name=<tfds name>")
  _validate_generation(cfg)
  _validate_rl(cfg)
  if cfg["mode"] == "distill":
    _validate_distillation(cfg)
  sharding.logical_rules(ml_collections.ConfigDict({"logical_axis_rules": cfg["logical_axis_rules"]}))


def _validate_reward_model(cfg: dict[str, Any]) -> None:
  if cfg["mode"] == "rm" and cfg["peft"] != "none":
    raise UserError(f"mode=rm trains the whole reward model (decoder and value head); peft={cfg['peft']} is not "
                    "supported there; set peft=none")
  if cfg["mode"] == "ppo" and cfg["peft"] != "none":
    raise UserError(f"mode=ppo trains the whole policy and its critic; peft={cfg['peft']} is not supported there; "
                    "set peft=none")
  if cfg["critic_load_parameters_path"] and cfg["mode"] not in ("rm", "ppo"):
    raise UserError(f"critic_load_parameters_path starts a value model, which mode={cfg['mode']} has none of; "
                    "use load_parameters_path for the policy's weights, or mode=rm or ppo")
  if cfg["reward_model_path"] and cfg["mode"] != "ppo":
    raise UserError(f"reward_model_path scores mode=ppo's rollouts; mode={cfg['mode']} does not use it")


def distill_strategies(entries: Sequence[Any]) -> dict[str, float]:
  """distill_strategy entries (`name` or [name, weight]) -> {name: weight}; raises a UserError for a bad entry."""
  strategies = {}
  for entry in entries:
    name, weight = None, None
    if isinstance(entry, str):
      name, weight = entry, 1.0
    elif isinstance(entry, (list, tuple)) and len(entry) == 2:
      name, weight = entry
    if name not in DISTILL_STRATEGIES or isinstance(weight, bool) or not isinstance(weight, (int, float)) \
        or weight < 0 or name in strategies:
      raise UserError(f"distill_strategy entry {entry!r}: expected a name or [name, weight >= 0], each name once, "
                      f"names among {', '.join(DISTILL_STRATEGIES)}")
    strategies[name] = float(weight)
  if not strategies:
    raise UserError(f"distill_strategy is empty; expected some of {', '.join(DISTILL_STRATEGIES)}")
  return strategies


def teacher_architecture(cfg: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
  """The teacher's architecture keys: the embedded defaults <- teacher_model_name's preset <- the config.yml of
  teacher_load_parameters_path's run <- teacher_hf_path's config.json."""
  arch = {key: base[key] for key in ARCHITECTURE_KEYS}
  layers = []
  if cfg["teacher_model_name"]:
    model_file = CONFIG_DIR / "models" / f"{cfg['teacher_model_name']}.yml"
    if not model_file.is_file():
      available = sorted(p.stem for p in (CONFIG_DIR / "models").glob("*.yml"))
      raise UserError(f"teacher_model_name={cfg['teacher_model_name']!r}: no {model_file}; available: "
                      f"{', '.join(available)}")
    layers.append((str(model_file), _read_yaml(model_file, "model config")))
  if cfg["teacher_load_parameters_path"]:
    run_config = _run_config_of(cfg["teacher_load_parameters_path"])
    if run_config is not None:
      layers.append((str(run_config), _read_yaml(run_config, "teacher run config")))
  if cfg["teacher_hf_path"]:
    cfg["teacher_hf_path"] = hf_config.resolve(cfg["teacher_hf_path"])
    layers.append((os.path.join(cfg["teacher_hf_path"], "config.json"), hf_config.config_keys(cfg["teacher_hf_path"])))
  for source, values in layers:
    for key in ARCHITECTURE_KEYS:
      if key in values:
        arch[key] = _coerce(key, values[key], base[key], source)
  return arch


def _run_config_of(path: str) -> Path | None:
  """The config.yml of the run a run directory, checkpoints/ directory or checkpoint step belongs to."""
  path = Path(path).resolve()
  for candidate in (path, path.parent, path.parent.parent, path.parent.parent.parent):
    if (candidate / "config.yml").is_file():
      return candidate / "config.yml"
  return None


def _validate_distillation(cfg: dict[str, Any]) -> None:
  if not cfg["teacher_load_parameters_path"] and not cfg["teacher_hf_path"]:
    raise UserError("mode=distill needs the teacher's weights: set teacher_load_parameters_path=<run or checkpoint> "
                    "or teacher_hf_path=<Hugging Face directory>")
  strategies = distill_strategies(cfg["distill_strategy"])
  if not 0.0 < cfg["distill_jsd_beta"] < 1.0:
    raise UserError(f"distill_jsd_beta={cfg['distill_jsd_beta']}: must be strictly between 0 and 1")
  if cfg["distill_temperature"] <= 0:
    raise UserError(f"distill_temperature={cfg['distill_temperature']}: must be positive")
  teacher = cfg[TEACHER_ARCHITECTURE]
  depths = (cfg["base_num_decoder_layers"], teacher["base_num_decoder_layers"])
  for pair in cfg["distill_layer_map"]:
    if (not isinstance(pair, (list, tuple)) or len(pair) != 2
        or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < d for i, d in zip(pair, depths))):
      raise UserError(f"distill_layer_map entry {pair!r}: expected [student_layer, teacher_layer] with the student's "
                      f"layer in 0..{depths[0] - 1} and the teacher's in 0..{depths[1] - 1}")
  if "feature_projection" in strategies and cfg["peft"] != "none":
    raise UserError("distill_strategy feature_projection trains a projection next to all the student's weights; "
                    "it does not combine with peft=lora/qlora")
  if cfg["distill_on_policy"] and (cfg["packing"] or not cfg["completion_only_loss"]):
    raise UserError("distill_on_policy=true replaces each row's completion with a sampled one: it needs packing=false "
                    "and completion_only_loss=true (the prompt is what precedes the loss tokens)")


def _validate_generation(cfg: dict[str, Any]) -> None:
  if cfg["top_p"] == 0.0:
    raise UserError("top_p=0: keeps no token; expected a value in (0, 1] (1 = off)")
  if cfg["prompt"] and cfg["prompts_file"]:
    raise UserError("prompt and prompts_file are both set; give one")
  if cfg["beam_width"] > 1 and cfg["num_samples"] > cfg["beam_width"]:
    raise UserError(f"num_samples={cfg['num_samples']} > beam_width={cfg['beam_width']}: beam search returns at "
                    f"most beam_width hypotheses per prompt")
  buckets = cfg["prefill_length_buckets"]
  if not buckets or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in buckets):
    raise UserError(f"prefill_length_buckets={buckets}: expected a non-empty list of positive integers")
  if any(not isinstance(s, str) or not s for s in cfg["stop_sequences"]):
    raise UserError(f"stop_sequences={cfg['stop_sequences']}: expected a list of non-empty strings")


def _validate_rl(cfg: dict[str, Any]) -> None:
  functions, weights = cfg["reward_functions"], cfg["reward_weights"]
  if any(not isinstance(f, str) or not f for f in functions):
    raise UserError(f"reward_functions={functions}: expected a list of names (built-ins or \"module:function\")")
  if weights and (len(weights) != len(functions) or any(
      isinstance(w, bool) or not isinstance(w, (int, float)) for w in weights)):
    raise UserError(f"reward_weights={weights}: expected {len(functions)} numbers (one per reward function) or []")
  if cfg["dual_clip_c"] and cfg["dual_clip_c"] <= 1.0:
    raise UserError(f"dual_clip_c={cfg['dual_clip_c']}: must be above 1 (or 0 = off)")
  if cfg["eval_num_prompts"] == 0 or cfg["eval_num_prompts"] < -1:
    raise UserError(f"eval_num_prompts={cfg['eval_num_prompts']}: expected a positive number, or -1 for all")
  if ("overlong" in functions or cfg["loss_algo"] == "dapo") and not (
      0 < cfg["overlong_buffer_tokens"] <= cfg["max_new_tokens"]):
    raise UserError(f"overlong_buffer_tokens={cfg['overlong_buffer_tokens']}: must be in 1..max_new_tokens "
                    f"({cfg['max_new_tokens']}) for the overlong reward")
  if cfg["mode"] not in RL_MODES:
    return
  if not functions and not cfg["reward_model_path"]:
    raise UserError(f"mode={cfg['mode']} needs reward_functions (e.g. [math_answer])"
                    + (" or reward_model_path" if cfg["mode"] == "ppo" else ""))
  if cfg["mode"] == "ppo" and (cfg["loss_algo"] != "grpo" or cfg["dynamic_sampling"] == "on"):
    raise UserError("mode=ppo has its own objective and samples each prompt once per rollout batch; leave loss_algo="
                    "grpo and dynamic_sampling off (they choose among the GRPO family)")
  if cfg["mode"] == "grpo" and cfg["num_generations"] < 2:
    raise UserError(f"num_generations={cfg['num_generations']}: group advantages need at least 2 completions per prompt")
  if cfg["temperature"] <= 0 or cfg["beam_width"] != 1:
    raise UserError(f"mode={cfg['mode']} samples its rollouts: set temperature > 0 and beam_width=1")
  if cfg["loss_algo"] == "dapo" and cfg["beta"]:
    raise UserError(f"loss_algo=dapo uses no KL term; set beta=0 (got {cfg['beta']})")
  if cfg["max_target_length"] <= cfg["max_new_tokens"]:
    raise UserError(f"max_target_length={cfg['max_target_length']} must hold a prompt and max_new_tokens="
                    f"{cfg['max_new_tokens']} completion tokens")


def _resolve_rl(cfg: dict[str, Any]) -> dict[str, Any]:
  """loss_algo's settings in place of "auto", and the rollout batch's size, checked against the step's batch."""
  scale, aggregation, dynamic = ALGO_DEFAULTS[cfg["loss_algo"]]
  if cfg["mode"] == "ppo":  # every token of the step weighs the same, as in TRL's PPOTrainer
    aggregation = "token-mean"
  resolved = {"scale_rewards": scale if cfg["scale_rewards"] == "auto" else cfg["scale_rewards"],
              "loss_aggregation": aggregation if cfg["loss_aggregation"] == "auto" else cfg["loss_aggregation"],
              "dynamic_sampling": dynamic if cfg["dynamic_sampling"] == "auto" else cfg["dynamic_sampling"],
              "epsilon_high": cfg["epsilon_high"] or (DAPO_EPSILON_HIGH if cfg["loss_algo"] == "dapo"
                                                      else cfg["epsilon"])}
  if cfg["dynamic_sampling_prompts"] and resolved["dynamic_sampling"] != "on":
    raise UserError(f"dynamic_sampling_prompts={cfg['dynamic_sampling_prompts']} sizes dynamic sampling's rounds, but "
                    "dynamic sampling is off: set dynamic_sampling=on or dynamic_sampling_prompts=0")
  if cfg["pack_groups"]:
    _check_pack_groups(cfg)
  if cfg["mode"] not in RL_MODES:
    return resolved
  step_rows, group = cfg["global_batch_size"], cfg["num_generations"]
  prompts = cfg["rollout_batch_size"]
  if not prompts:
    if step_rows % group:
      raise UserError(f"one update's batch ({step_rows} completions) is not a whole number of groups of "
                      f"num_generations={group}; set rollout_batch_size or change the batch")
    prompts = step_rows // group
  if (prompts * group) % step_rows:
    raise UserError(f"rollout_batch_size={prompts} prompts x num_generations={group} = {prompts * group} completions "
                    f"is not a whole number of update batches of {step_rows} (per_device_batch_size x devices x "
                    "gradient_accumulation_steps)")
  return {**resolved, "rollout_batch_size": prompts, "updates_per_rollout": prompts * group // step_rows}


def _check_pack_groups(cfg: dict[str, Any]) -> None:
  """pack_groups packs a group into its completions' rows: each device's rows must hold whole groups."""
  group = cfg["num_generations"]
  if cfg["mode"] != "grpo":
    raise UserError(f"pack_groups packs GRPO's groups; mode={cfg['mode']} has none: set pack_groups=false")
  if cfg["max_new_tokens"] < 2:
    raise UserError("pack_groups needs max_new_tokens >= 2 (a completion slot holds all its tokens but the last)")
  device_rows = cfg["micro_batch_size"] / cfg["num_devices"]
  if device_rows % group:
    raise UserError(f"pack_groups needs each device's {device_rows:g} rows of a micro-batch to be whole groups of "
                    f"num_generations={group}; change per_device_batch_size")


def derive(cfg: dict[str, Any], num_devices: int, num_processes: int, process_index: int,
           num_slices: int = 1) -> dict[str, Any]:
  """Adds values computed from the config and the devices: resolved mesh, batch sizes, run paths."""
  cfg = dict(cfg)
  resolved = sharding.resolve_parallelism(cfg, num_devices, num_slices)
  for group, sizes in resolved.items():
    for axis, size in sizes.items():
      cfg[f"{group}_{axis}_parallelism"] = size
  mesh_size = {a: resolved["ici"][a] * resolved["dcn"][a] for a in sharding.MESH_AXES}
  rules = dict(sharding.logical_rules(ml_collections.ConfigDict({"logical_axis_rules": cfg["logical_axis_rules"]})))

  def axes_size(logical: str) -> int:
    axes = rules.get(logical)
    axes = (axes,) if isinstance(axes, str) else (axes or ())
    return math.prod(mesh_size[a] for a in axes)

  micro = cfg["per_device_batch_size"] * num_devices
  if abs(micro - round(micro)) > 1e-9 or round(micro) < 1:
    raise UserError(f"per_device_batch_size={cfg['per_device_batch_size']} x {num_devices} devices = {micro} rows: "
                    f"the batch must be a whole number of rows; change per_device_batch_size")
  micro = int(round(micro))
  batch_shards = axes_size("activation_batch")
  if micro % batch_shards or micro % num_processes:
    raise UserError(f"per_device_batch_size={cfg['per_device_batch_size']} gives {micro} rows per micro-batch, "
                    f"which does not divide over {batch_shards} batch shards (data x fsdp) and {num_processes} "
                    f"processes; choose per_device_batch_size so that it does")
  length_shards = axes_size("activation_length")
  if cfg["max_target_length"] % length_shards:
    raise UserError(f"max_target_length={cfg['max_target_length']} must be divisible by the sequence "
                    f"parallelism ({length_shards})")
  run_dir = os.path.join(cfg["base_output_directory"], cfg["run_name"])
  cfg.update(
      num_devices=num_devices, num_processes=num_processes, process_index=process_index,
      micro_batch_size=micro, global_batch_size=micro * cfg["gradient_accumulation_steps"],
      process_batch_size=micro * cfg["gradient_accumulation_steps"] // num_processes,
      eval_batch_size=micro // num_processes, warmup_steps=int(cfg["warmup_steps_fraction"] * cfg["steps"]),
      run_dir=run_dir, checkpoint_dir=os.path.join(run_dir, "checkpoints"),
      tensorboard_dir=os.path.join(run_dir, "tensorboard"), metrics_file=os.path.join(run_dir, "metrics.jsonl"))
  cfg.update(updates_per_rollout=0)
  cfg.update(_resolve_rl(cfg))
  return cfg


def load(argv: Sequence[str], *, initialize_distributed: bool = True) -> ml_collections.FrozenConfigDict:
  """argv (without the program name) -> the frozen, validated config with derived values.

  Starts multi-process JAX first when the environment or config asks for it, since the device count
  that derived values need is only known afterwards.
  """
  cfg = layer(argv)
  validate(cfg)
  if initialize_distributed:
    distributed.initialize(cfg["coordinator_address"], cfg["num_processes"], cfg["process_id"])
  import jax  # pylint: disable=import-outside-toplevel
  devices = jax.devices()
  cfg = derive(cfg, len(devices), jax.process_count(), jax.process_index(), sharding.num_slices(devices))
  return ml_collections.FrozenConfigDict(cfg)


# Keys of a saved run config that describe the machine it ran on rather than the model.
_MACHINE_KEYS = tuple(f"{g}_{a}_parallelism" for g in ("ici", "dcn") for a in sharding.MESH_AXES) + (
    "coordinator_address", "num_processes", "process_id", "per_device_batch_size", "gradient_accumulation_steps",
    "export_hf_path")


def load_saved(saved: dict[str, Any]) -> ml_collections.FrozenConfigDict:
  """A run's saved config.yml (architecture already resolved), re-derived for the devices here."""
  base = _read_yaml(BASE_CONFIG, "base config")
  cfg = dict(base)
  for key, value in saved.items():
    if key in base and key not in _MACHINE_KEYS:
      cfg[key] = _coerce(key, value, base[key], "saved config.yml")
  if cfg["mode"] == "distill":  # the teacher's sources may be gone; its resolved architecture was saved
    cfg[TEACHER_ARCHITECTURE] = saved.get(TEACHER_ARCHITECTURE) or teacher_architecture(cfg, base)
  validate(cfg)
  import jax  # pylint: disable=import-outside-toplevel
  devices = jax.devices()
  cfg = derive(cfg, len(devices), jax.process_count(), jax.process_index(), sharding.num_slices(devices))
  return ml_collections.FrozenConfigDict(cfg)


def to_yaml(config: ml_collections.FrozenConfigDict) -> str:
  """The config as YAML (lists as lists), for the copy kept in the run directory."""
  def plain(value):
    if isinstance(value, (list, tuple)):
      return [plain(v) for v in value]
    return {k: plain(v) for k, v in value.items()} if hasattr(value, "items") else value
  return yaml.safe_dump({k: plain(v) for k, v in config.items()}, sort_keys=False, width=120)
