"""Config layering, typing, validation errors and derived values."""

import shutil

import pytest
import yaml

from tunix_core import config as config_lib
from tunix_core.errors import UserError


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
  """A copy of configs/ with a model file, so layering can be tested without touching the real one."""
  shutil.copy(config_lib.BASE_CONFIG, tmp_path / "base.yml")
  (tmp_path / "models").mkdir()
  (tmp_path / "models" / "wide.yml").write_text("base_emb_dim: 256\nbase_mlp_dim: 512\nhead_dim: 64\n")
  monkeypatch.setattr(config_lib, "CONFIG_DIR", tmp_path)
  monkeypatch.setattr(config_lib, "BASE_CONFIG", tmp_path / "base.yml")
  return tmp_path


def test_base_defaults_load_and_freeze():
  cfg = config_lib.load(["configs/base.yml"], initialize_distributed=False)
  base = yaml.safe_load(config_lib.BASE_CONFIG.read_text())
  assert cfg.learning_rate == base["learning_rate"] and cfg.mode == "sft"
  with pytest.raises((AttributeError, TypeError)):
    cfg.steps = 3  # frozen


def test_layering_order_base_model_recipe_cli(config_dir, tmp_path):
  recipe = tmp_path / "recipe.yml"
  recipe.write_text("model_name: wide\nbase_mlp_dim: 1024\nsteps: 7\nlearning_rate: 1e-4\n")
  cfg = config_lib.layer([str(recipe), "steps=9", "dtype=bfloat16", "packing=false"])
  assert cfg["base_emb_dim"] == 256          # from the model file
  assert cfg["base_mlp_dim"] == 1024         # the recipe beats the model file
  assert cfg["steps"] == 9                   # the command line beats the recipe
  assert cfg["learning_rate"] == 1e-4 and isinstance(cfg["learning_rate"], float)  # YAML "1e-4" is a string
  assert cfg["packing"] is False and cfg["dtype"] == "bfloat16"


def test_cli_model_name_picks_the_model_file(config_dir):
  assert config_lib.layer(["model_name=wide"])["head_dim"] == 64


def test_cli_values_are_typed_by_the_base_value():
  cfg = config_lib.layer(["steps=12", "learning_rate=0.5", "scan_layers=False", "run_name=123",
                          "mlp_activations=[gelu, linear]", "per_device_batch_size=2"])
  assert cfg["steps"] == 12 and cfg["learning_rate"] == 0.5 and cfg["scan_layers"] is False
  assert cfg["run_name"] == "123" and cfg["mlp_activations"] == ["gelu", "linear"]
  assert cfg["per_device_batch_size"] == 2.0


def test_unknown_key_names_the_closest_keys():
  with pytest.raises(UserError, match=r"unknown config key 'learning_rat'.*learning_rate"):
    config_lib.layer(["learning_rat=0.1"])


def test_unknown_key_in_a_yaml_names_the_file(tmp_path):
  recipe = tmp_path / "r.yml"
  recipe.write_text("stepz: 3\n")
  with pytest.raises(UserError, match=r"stepz.*r\.yml.*steps"):
    config_lib.layer([str(recipe)])


@pytest.mark.parametrize("override, message", [
    ("steps=ten", r"steps='ten'.*expected an integer"),
    ("learning_rate=fast", r"learning_rate='fast'.*expected a number"),
    ("packing=maybe", r"packing='maybe'.*expected true or false"),
    ("mlp_activations=silu", r"mlp_activations='silu'.*expected a list"),
])
def test_wrong_types(override, message):
  with pytest.raises(UserError, match=message):
    config_lib.layer([override])


@pytest.mark.parametrize("override, message", [
    ("mode=rlhf", r"mode='rlhf': expected one of sft, dpo, orpo, simpo"),
    ("steps=0", r"steps=0: must be positive"),
    ("decode_halvings=-1", r"decode_halvings=-1: must be >= 0"),
    ("warmup_steps_fraction=1.5", r"between 0 and 1"),
    ("base_num_kv_heads=3", r"base_num_kv_heads=3 must divide"),
    ("head_dim=7", r"even head_dim"),
    ("eval_steps=0", r"eval_steps=0"),
    ("run_name=a/b", r"run_name"),
    ("remat_policy=some", r"remat_policy='some'"),
    ("mlp_activations=[silu]", r"mlp_activations"),
    ("logical_axis_rules=[[batch, [nodes]]]", r"mesh axes \['nodes'\]"),
])
def test_invalid_values(override, message):
  with pytest.raises(UserError, match=message):
    config_lib.validate(config_lib.layer([override]))


def test_missing_config_file_and_bad_argument():
  with pytest.raises(UserError, match="no such file"):
    config_lib.layer(["configs/nope.yml"])
  with pytest.raises(UserError, match="expected key=value"):
    config_lib.layer(["configs/base.yml", "steps"])
  with pytest.raises(UserError, match="model_name='nope'"):
    config_lib.layer(["model_name=nope"])


def _derive(*overrides, devices=8, processes=1):
  cfg = config_lib.layer(list(overrides))
  config_lib.validate(cfg)
  return config_lib.derive(cfg, devices, processes, 0)


def test_derived_batch_sizes_and_paths():
  cfg = _derive("per_device_batch_size=2", "gradient_accumulation_steps=3", "run_name=r", "base_output_directory=/o",
                processes=2)
  assert cfg["micro_batch_size"] == 16 and cfg["global_batch_size"] == 48
  assert cfg["process_batch_size"] == 24 and cfg["eval_batch_size"] == 8
  assert cfg["run_dir"] == "/o/r" and cfg["checkpoint_dir"] == "/o/r/checkpoints"
  assert cfg["ici_fsdp_parallelism"] == 8 and cfg["dcn_data_parallelism"] == 1


def test_fractional_per_device_batch():
  assert _derive("per_device_batch_size=0.25", "ici_fsdp_parallelism=2", "ici_tensor_parallelism=4")[
      "micro_batch_size"] == 2


@pytest.mark.parametrize("overrides, message", [
    (("per_device_batch_size=0.3",), r"whole number of rows"),
    (("per_device_batch_size=0.25",), r"does not divide over 8 batch shards"),
    (("ici_fsdp_parallelism=3",), r"= 3, but there are 8"),
    (("ici_fsdp_parallelism=-1", "ici_data_parallelism=-1"), r"at most one ici_\*_parallelism may be -1"),
    (("ici_tensor_parallelism=3",), r"multiply to 3, which does not divide"),
    (("ici_sequence_parallelism=8", "ici_fsdp_parallelism=1", "max_target_length=100"), r"divisible by the sequence"),
])
def test_device_dependent_errors(overrides, message):
  with pytest.raises(UserError, match=message):
    _derive(*overrides)
