"""THE training loop: `python3 -m tunix_core.train configs/base.yml [key=value ...]`.

config -> mesh -> model + optimizer state (created in their shardings, or restored) -> data -> one
jitted train_step shared by every mode -> metrics (fetched one step late), eval, async checkpoints.
"""

from collections.abc import Callable, Iterator
import contextlib
import dataclasses
import os
import sys
import time
from typing import Any, NamedTuple

from absl import app, flags, logging
from cloud_tpu_diagnostics import diagnostic
from cloud_tpu_diagnostics.configuration import debug_configuration, diagnostic_configuration
from cloud_tpu_diagnostics.configuration import stack_trace_configuration
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tunix_core import checkpoint, config as config_lib, distributed, export, metrics as metrics_lib, models
from tunix_core import on_policy, optimizers, peft, reference, teacher as teacher_lib
from tunix_core import sharding
from tunix_core.data import pipeline, preference, tokenizer as tokenizer_lib
from tunix_core.errors import UserError
from tunix_core.generate import sampler
from tunix_core.generate.sampling import SamplingParams
from tunix_core.models import attention as attention_lib, hf_weights, value_head
from tunix_core.modes import MODES, distill
from tunix_core.rl import data as rl_data, group_rows, trainer as rl_trainer

# {"params": trainable pure dict, "opt_state": optax state, "step": int32 scalar,
#  "frozen": weights the step reads but never updates, e.g. {"reference": ...} for DPO, {"teacher": ...} for distill}
# With distill's feature_projection, params also hold {distill.PROJECTION_KEY: ...} next to the model's own.
TrainState = dict[str, Any]
BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
REFERENCE_KEY = "reference_logps"  # [rows] per-row reference log-probs, with precompute_reference=true


def state_shardings(abstract_params, param_shardings, frozen_shardings: dict, tx: optax.GradientTransformation,
                    mesh: Mesh, ema: bool = False) -> TrainState:
  """Shardings of the whole train state: optimizer moments and the moving average (ema) follow their params, the
  rest is replicated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                        transform_non_params=lambda _: replicated)
  shardings = {"params": param_shardings, "opt_state": opt_shardings, "step": replicated, "frozen": frozen_shardings}
  return {**shardings, "ema": param_shardings} if ema else shardings


def averaged(state: TrainState) -> TrainState:
  """The state with its params replaced by their moving average where the run keeps one (ema_decay > 0): the
  weights that evals, the export and the end-of-run sample use."""
  return {**state, "params": state["ema"]} if "ema" in state else state


def make_train_step(graphdef: nnx.GraphDef, config: ml_collections.FrozenConfigDict,
                    tx: optax.GradientTransformation, schedule: optax.Schedule, shardings: TrainState,
                    batch_sharding: NamedSharding, teacher_graphdef: nnx.GraphDef | None = None) -> Callable:
  """The one jitted step: micro-batches by lax.scan, loss normalised over the whole step, clip, update.

  batch arrays are [gradient_accumulation_steps, micro_batch, length]. The state is donated. teacher_graphdef:
  mode=distill's teacher graph, for the weights in state["frozen"]["teacher"].
  """
  mode = MODES[config.mode]

  def micro_loss(params, frozen, micro_batch):
    out = mode_loss(mode, graphdef, config, params, frozen, micro_batch, teacher_graphdef)
    return out.loss_sum, out

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    params, frozen = state["params"], state["frozen"]
    first = jax.tree.map(lambda x: x[0], batch)
    metric_shapes = jax.eval_shape(micro_loss, params, frozen, first)[1].metrics
    zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), jnp.float32(0), jnp.float32(0),
             jax.tree.map(lambda m: jnp.zeros(m.shape, jnp.float32), metric_shapes))
    zeros = (jax.lax.with_sharding_constraint(zeros[0], shardings["params"]), *zeros[1:])

    def accumulate(carry, micro_batch):
      grads, loss_sum, weight, extra = carry
      (micro_sum, out), micro_grads = grad_fn(params, frozen, micro_batch)
      grads = jax.tree.map(lambda g, mg: g + mg.astype(jnp.float32), grads, micro_grads)
      extra = jax.tree.map(lambda e, m: e + m.astype(jnp.float32), extra, out.metrics)
      return (grads, loss_sum + micro_sum, weight + out.weight, extra), None

    (grads, loss_sum, weight, extra), _ = jax.lax.scan(accumulate, zeros, batch)
    denominator = jnp.where(weight > 0, weight, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype), grads, params)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state, "step": state["step"] + 1,
                 "frozen": frozen}
    if "ema" in state:
      decay = config.ema_decay
      new_state["ema"] = jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), state["ema"],
                                      new_state["params"])
    step_metrics = {"loss": loss_sum / denominator, "grad_norm": optax.tree.norm(grads),
                    "learning_rate": schedule(state["step"]), mode.WEIGHT_NAME: weight,
                    **{k: v / denominator for k, v in extra.items()}}
    return new_state, step_metrics

  replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
  return jax.jit(train_step, in_shardings=(shardings, batch_shardings(config, batch_sharding)),
                 out_shardings=(shardings, replicated), donate_argnums=(0,))


def mode_batch_keys(config) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(per-token, per-row) keys a batch carries beside BATCH_KEYS: precomputed reference log-probs, an RL mode's."""
  mode = MODES[config.mode]
  tokens, rows = mode.batch_keys(config) if hasattr(mode, "batch_keys") else ((), ())
  return tokens, rows + ((REFERENCE_KEY,) if config.precompute_reference else ())


def batch_shardings(config, batch_sharding: NamedSharding) -> dict[str, NamedSharding]:
  """Each batch key's sharding: token arrays in `batch_sharding`, per-row values without its length axis."""
  tokens, rows = mode_batch_keys(config)
  shardings = {key: batch_sharding for key in (*BATCH_KEYS, *tokens)}
  shardings.update({key: distributed.row_sharding(batch_sharding) for key in rows})
  return shardings


def mode_loss(mode, graphdef: nnx.GraphDef, config, params, frozen: dict, batch: dict[str, jax.Array],
              teacher_graphdef: nnx.GraphDef | None = None, evaluation: bool = False):
  """The mode's loss (its eval_loss, where it has one, when `evaluation`) for the policy `params`, with its second
  model: the reference model when the mode needs one, distill's teacher.

  With LoRA/QLoRA `params` are the adapters and frozen["base"] the (quantized) base weights; the reference
  is the same base with the adapters switched off, so no second copy of the weights exists. Trainable entries
  that are not the model's (distill's projection) go to the mode by name. A mode whose REFERENCE_IN_LOSS is False
  keeps its frozen reference for `prepare` only (PPO: the KL goes into the rewards), and its `params` may be another
  module's (PPO: value_head.ActorCritic's).
  """
  extra = {key: params[key] for key in checkpoint.TRAINING_ONLY_KEYS if key in params}
  params = {key: value for key, value in params.items() if key not in extra}
  if "base" in frozen:
    policy = nnx.merge(graphdef, frozen["base"], params)
    reference = nnx.merge(graphdef, frozen["base"], peft.adapters_off(params))
  else:
    policy = nnx.merge(graphdef, params)
    in_loss = mode.needs_reference(config) and getattr(mode, "REFERENCE_IN_LOSS", True)
    reference = nnx.merge(graphdef, frozen["reference"]) if in_loss else None
  if teacher_graphdef is not None:
    reference = nnx.merge(teacher_graphdef, frozen["teacher"])
  elif not mode.needs_reference(config):
    reference = None
  loss_fn = mode.eval_loss if evaluation and hasattr(mode, "eval_loss") else mode.loss
  return loss_fn(policy, batch, config, reference, **extra)


def make_eval_step(graphdef: nnx.GraphDef, config: ml_collections.FrozenConfigDict, shardings: TrainState,
                   batch_sharding: NamedSharding, teacher_graphdef: nnx.GraphDef | None = None) -> Callable:
  """Jitted (loss_sum, weight, metric sums) of the mode's eval loss (its `eval_loss` where it has one, else its
  loss) on one [micro_batch, length] batch, for (params, frozen)."""
  mode = MODES[config.mode]

  def eval_step(params, frozen, batch):
    out = mode_loss(mode, graphdef, config, params, frozen, batch, teacher_graphdef, evaluation=True)
    return out.loss_sum, out.weight, out.metrics

  return jax.jit(eval_step, in_shardings=(shardings["params"], shardings["frozen"],
                                         batch_shardings(config, batch_sharding)))


def to_device_batch(local: dict[str, np.ndarray], config, sharding_: NamedSharding, accumulate: bool
                    ) -> dict[str, jax.Array]:
  """This process's rows -> global arrays; training batches get a leading micro-batch axis."""
  tokens, rows = mode_batch_keys(config)
  local = {k: local[k] for k in (*BATCH_KEYS, *tokens, *rows)}
  if accumulate:
    local = {k: v.reshape(config.gradient_accumulation_steps, -1, *v.shape[1:]) for k, v in local.items()}
  return distributed.global_batch(local, sharding_, config.micro_batch_size)


def row_length(config) -> int:
  """Tokens in one training row: max_target_length, or with pack_groups a group's packed length over its
  completions (group_rows.row_width)."""
  if config.pack_groups:
    return group_rows.row_width(config.num_generations, config.max_target_length, config.max_new_tokens)
  return config.max_target_length


def model_flops_per_token(config, num_params: int) -> float:
  """Training FLOPs per token of the configured decoder (see metrics.training_flops_per_token)."""
  return metrics_lib.training_flops_per_token(
      num_params=num_params, num_layers=config.base_num_decoder_layers, num_heads=config.base_num_query_heads,
      head_dim=config.head_dim, seq_len=config.max_target_length,
      num_embedding_params=0 if config.logits_via_embedding else config.vocab_size * config.base_emb_dim)


def evaluate(eval_step: Callable, state: TrainState, batches: list[dict[str, jax.Array]]) -> dict[str, float]:
  """{"eval/loss": the weighted eval loss, "eval/<metric>": each mode metric likewise} over the given batches (one
  host sync at the end)."""
  totals = jax.device_get([eval_step(state["params"], state["frozen"], batch) for batch in batches])
  denominator = max(float(sum(t[1] for t in totals)), 1.0)
  metrics = {f"eval/{key}": float(sum(t[2][key] for t in totals)) / denominator for key in totals[0][2]}
  return {"eval/loss": float(sum(t[0] for t in totals)) / denominator, **metrics}


class Setup(NamedTuple):
  """What a run is built from: the mesh, the model graph, the optimizer and the jitted steps."""
  mesh: Mesh
  rules: tuple
  model_config: models.ModelConfig
  graphdef: nnx.GraphDef                 # the plain model (export, sampling); for value_model its ValueModel
  abstract_params: Any                   # the plain model's parameters
  param_shardings: Any
  value_model: bool                      # the model is value_head.ValueModel (mode=rm): the decoder + a scalar head
  critic_graphdef: nnx.GraphDef | None   # mode=ppo: the critic's ValueModel graph; the step trains an ActorCritic
  abstract_trainable: Any                # what the step trains: the model's params, LoRA's adapters, or PPO's pair
  lora: peft.LoraModel | None            # LoRA/QLoRA: the adapted graph, adapters (trained) and base (frozen)
  teacher: teacher_lib.Teacher | None    # mode=distill: the frozen teacher
  projection: teacher_lib.Projection | None  # mode=distill with feature_projection: its trainable maps
  needs_reference: bool
  shardings: TrainState
  tx: optax.GradientTransformation
  train_step: Callable
  eval_step: Callable
  train_batch_sharding: NamedSharding
  eval_batch_sharding: NamedSharding

  @contextlib.contextmanager
  def activate(self) -> Iterator[None]:
    """The mesh and logical-axis rules that the steps are traced and run under."""
    with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
      yield

  def new_state(self, params, frozen: dict) -> TrainState:
    state = {"params": params, "opt_state": self.tx.init(params), "step": jnp.zeros((), jnp.int32), "frozen": frozen}
    return {**state, "ema": jax.tree.map(jnp.copy, params)} if "ema" in self.shardings else state

  def starting_params(self, config) -> dict:
    """The plain weights training starts from: load_parameters_path, else hf_path, else a seeded init. A value model
    starts from critic_load_parameters_path, else from those weights as its decoder under a zero value head; PPO's
    pair is the policy's weights and such a value model."""
    if self.value_model:
      return value_head.starting_params(
          config.critic_load_parameters_path, self.abstract_params, self.param_shardings,
          lambda: self.policy_params(config, self.abstract_params["decoder"], self.param_shardings["decoder"]))
    policy = self.policy_params(config, self.abstract_params, self.param_shardings)
    if self.critic_graphdef is None:
      return policy
    critic = value_head.starting_params(config.critic_load_parameters_path, self.abstract_trainable["critic"],
                                        self.shardings["params"]["critic"], lambda: jax.tree.map(jnp.copy, policy))
    return {"policy": policy, "critic": critic}

  def policy_params_of(self, params: dict) -> dict:
    """The policy's part of trainable params (PPO trains {"policy", "critic"})."""
    return params if self.critic_graphdef is None else params["policy"]

  def policy_params(self, config, abstract_params, shardings) -> dict:
    """The decoder's starting weights (abstract_params/shardings: the Transformer's): load_parameters_path, else
    hf_path, else a seeded init."""
    if config.load_parameters_path:
      return checkpoint.load_parameters(config.load_parameters_path,
                                        checkpoint.abstract_with_shardings(abstract_params, shardings))
    if config.hf_path:
      return hf_weights.load(config.hf_path, self.model_config, abstract_params, shardings)
    return models.init_params(self.model_config, config.seed, shardings)

  def plain_params(self, state: TrainState) -> dict:
    """The plain model's parameters of a state (LoRA adapters folded into the base; no training-only entries)."""
    if self.lora is None:
      params = self.policy_params_of(state["params"])
      return {k: v for k, v in params.items() if k not in checkpoint.TRAINING_ONLY_KEYS}
    return peft.merge(self.lora, state["frozen"]["base"], state["params"])

  def initial_state(self, config, checkpointer: checkpoint.Checkpointer | None, train_iterator,
                    start: dict | None = None) -> TrainState:
    """Resumes the run's latest checkpoint (moving the iterator too), else starts from `start` (default
    `starting_params`, loaded here), which it donates.

    The frozen weights (DPO's reference: the starting weights; distill's teacher) are rebuilt from their source on
    resume; checkpoints hold only what training changes.
    """
    latest = checkpointer.latest_step() if checkpointer else None
    if start is None and (latest is None or self.needs_reference or self.lora):
      start = self.starting_params(config)
    if self.lora is not None:
      frozen = {"base": peft.frozen_from_params(self.lora, start, donate=True)}
      start = peft.init_adapters(self.lora, config.seed)
    else:
      frozen = {"reference": jax.tree.map(jnp.copy, self.policy_params_of(start))} if self.needs_reference else {}
    if self.teacher is not None:
      frozen["teacher"] = self.teacher.load(config)
    if latest is None:
      if self.projection is not None:
        start = {**start, distill.PROJECTION_KEY: self.projection.init(
            config.seed, self.shardings["params"][distill.PROJECTION_KEY])}
      return jax.jit(self.new_state, out_shardings=self.shardings, donate_argnums=(0,))(start, frozen)
    abstract = checkpoint.abstract_with_shardings(
        jax.eval_shape(self.new_state, self.abstract_trainable, {}), {**self.shardings, "frozen": {}})
    if config.process_index == 0:
      print(f"resuming {config.run_dir} from step {latest}", flush=True)
    return {**checkpointer.restore(latest, abstract, train_iterator), "frozen": frozen}


def build(config: ml_collections.FrozenConfigDict) -> Setup:
  """Mesh, abstract model, shardings, optimizer and the jitted steps (traced on first call, in `activate()`)."""
  mesh = sharding.build_mesh(config)
  rules = sharding.logical_rules(config)
  peft_config = peft.PeftConfig.from_config(config)
  value_model = config.mode in VALUE_MODEL_MODES
  critic_graphdef = None
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    model_config = models.ModelConfig.from_config(config)
    if config.mode == "distill":
      model_config = dataclasses.replace(model_config, attention=_distill_attention(config, model_config))
    graphdef, abstract_state = models.abstract_model(
        model_config, value_head.ValueModel if value_model else models.Transformer)
    abstract_params = nnx.to_pure_dict(abstract_state)
    param_shardings = models.param_shardings(abstract_state, mesh)
    lora = peft.lora_model(model_config, peft_config, mesh) if peft_config else None
    teacher, projection, step_graphdef = None, None, graphdef
    if config.mode == "distill":
      teacher = teacher_lib.build(config, mesh, model_config.attention)
      if "feature_projection" in distill.strategies(config):
        projection = teacher_lib.projection(config, model_config, teacher, len(distill.layer_map(config)))
        projection_abstract, projection_shardings = projection.abstract_and_shardings(mesh)
    if config.mode in ACTOR_CRITIC_MODES:
      critic_graphdef = models.abstract_model(model_config, value_head.ValueModel)[0]
      step_graphdef, pair_state = models.abstract_model(model_config, value_head.ActorCritic)
      trainable, trainable_shardings = nnx.to_pure_dict(pair_state), models.param_shardings(pair_state, mesh)
  tx = optimizers.build_optimizer(config)
  needs_reference = MODES[config.mode].needs_reference(config)
  if lora is not None:
    step_graphdef, trainable, trainable_shardings = lora.graphdef, lora.abstract_trainable, lora.trainable_shardings
    frozen_shardings = {"base": lora.frozen_shardings}
  else:
    if critic_graphdef is None:
      trainable, trainable_shardings = abstract_params, param_shardings
    frozen_shardings = {"reference": param_shardings} if needs_reference else {}
  if teacher is not None:
    frozen_shardings["teacher"] = teacher.param_shardings
  if projection is not None:
    trainable = {**trainable, distill.PROJECTION_KEY: projection_abstract}
    trainable_shardings = {**trainable_shardings, distill.PROJECTION_KEY: projection_shardings}
  shardings = state_shardings(trainable, trainable_shardings, frozen_shardings, tx, mesh, ema=config.ema_decay > 0)
  teacher_graphdef = teacher.graphdef if teacher is not None else None
  train_batch_sharding = sharding.batch_sharding(mesh, rules, leading_axes=1)
  eval_batch_sharding = sharding.batch_sharding(mesh, rules)
  return Setup(
      mesh=mesh, rules=rules, model_config=model_config, graphdef=graphdef, abstract_params=abstract_params,
      param_shardings=param_shardings, value_model=value_model, critic_graphdef=critic_graphdef,
      abstract_trainable=trainable, lora=lora, teacher=teacher, projection=projection, needs_reference=needs_reference,
      shardings=shardings, tx=tx,
      train_step=make_train_step(step_graphdef, config, tx, optimizers.learning_rate_schedule(config), shardings,
                                 train_batch_sharding, teacher_graphdef),
      eval_step=make_eval_step(step_graphdef, config, shardings, eval_batch_sharding, teacher_graphdef),
      train_batch_sharding=train_batch_sharding, eval_batch_sharding=eval_batch_sharding)


def _distill_attention(config, model_config: models.ModelConfig) -> str:
  """The attention implementation of the student and the teacher: attention_transfer reads attention
  probabilities, which only the xla path materialises, so it replaces whatever `attention` would run (said once;
  with scanned layers every layer runs the same implementation)."""
  if not distill.needs_attention_probs(config):
    return model_config.attention
  resolved = attention_lib.resolve(model_config.attention, dtype=model_config.dtype,
                                   logit_softcap=model_config.attn_logit_softcap)
  if config.process_index == 0:
    print(f"distill: attention_transfer needs attention probabilities, which only attention=xla materialises: the "
          f"student's and the teacher's layers run xla in training (attention={config.attention} would run "
          f"{resolved})", flush=True)
  return "xla"


PREFERENCE_MODES = ("dpo", "orpo", "simpo", "rm")
VALUE_MODEL_MODES = ("rm",)  # modes that train a value_head.ValueModel (the decoder + a scalar head), not the LM
ACTOR_CRITIC_MODES = ("ppo",)  # modes that train the LM and a critic together (value_head.ActorCritic)
RL_MODES = config_lib.RL_MODES


def starting_point(config) -> str:
  """Where the starting weights come from; with LoRA/QLoRA the base the checkpoint's adapters belong to."""
  if config.load_parameters_path:
    return f"load_parameters_path={config.load_parameters_path}"
  return f"hf_path={config.hf_path}" if config.hf_path else f"init seed={config.seed}"


def make_data(config, tokenizer) -> tuple[Any, list[dict]]:
  """This process's training iterator and eval batches, in the layout the mode expects."""
  if config.mode in PREFERENCE_MODES:
    return preference.make_preference_iterator(config, tokenizer), preference.make_preference_eval_batches(
        config, tokenizer)
  if config.mode in RL_MODES:  # prompts; evaluation is eval/accuracy on rl_data.eval_prompts, not a loss
    return rl_data.make_prompt_iterator(config, tokenizer), []
  return pipeline.make_train_iterator(config, tokenizer), pipeline.make_eval_batches(config, tokenizer)


def train(config: ml_collections.FrozenConfigDict) -> dict[str, Any]:
  """Runs (or resumes) the configured training; returns a summary (final losses, paths, sample)."""
  tokenizer = tokenizer_lib.load_tokenizer(config.tokenizer_path)
  if tokenizer.vocab_size > config.vocab_size:
    raise UserError(f"tokenizer_path={config.tokenizer_path} has {tokenizer.vocab_size} tokens but "
                    f"vocab_size={config.vocab_size}; set vocab_size >= {tokenizer.vocab_size}")
  train_iterator, eval_host_batches = make_data(config, tokenizer)
  setup = build(config)
  with setup.activate():
    checkpointer = checkpoint.Checkpointer(config) if config.enable_checkpointing else None
    try:
      start, tables = None, None
      if config.precompute_reference:
        start = setup.starting_params(config)
        tables = reference.compute_tables(config, setup, start, tokenizer)
        eval_host_batches = [reference.attach(b, tables["eval"]) for b in eval_host_batches]
      state = setup.initial_state(config, checkpointer, train_iterator, start)
      rl = None
      if config.mode in RL_MODES:
        rl = rl_trainer.RLTrainer(config, setup, tokenizer, MODES[config.mode], train_iterator,
                                  rl_data.eval_prompts(config, tokenizer))
      return _loop(config, setup, state, train_iterator, eval_host_batches, tokenizer, checkpointer,
                   tables["train"] if tables else None, rl)
    finally:
      if checkpointer:
        checkpointer.close()


def _loop(config, setup: Setup, state: TrainState, train_iterator, eval_host_batches, tokenizer,
          checkpointer: checkpoint.Checkpointer | None, reference_table: np.ndarray | None,
          rl: rl_trainer.RLTrainer | None = None) -> dict[str, Any]:
  """Steps from the state's step to config.steps; see `train`. reference_table: precomputed reference log-probs of
  the training pairs (precompute_reference=true), attached to each batch. rl: an RL mode's rollouts, which replace
  the data iterator's batches (its iterator then yields prompts) and add eval/accuracy, also before the first step."""
  mode = MODES[config.mode]
  is_primary = config.process_index == 0
  eval_batches = [to_device_batch(b, config, setup.eval_batch_sharding, accumulate=False)
                  for b in eval_host_batches]
  start_step = int(jax.device_get(state["step"]))
  n_params = models.num_params(setup.abstract_params)
  flops_per_token = model_flops_per_token(config, n_params)
  peak = metrics_lib.device_peak_flops(jax.devices()[0])
  tokens_per_step = config.global_batch_size * row_length(config)
  if is_primary:
    os.makedirs(config.run_dir, exist_ok=True)
    with open(os.path.join(config.run_dir, "config.yml"), "w") as f:
      f.write(config_lib.to_yaml(config))
    print(f"{config.mode}: {n_params:,} parameters, {config.num_devices} device(s), mesh {dict(setup.mesh.shape)}, "
          f"global batch {config.global_batch_size} x {row_length(config)} tokens", flush=True)

  summary: dict[str, Any] = {"run_dir": config.run_dir, "start_step": start_step}
  writer = metrics_lib.MetricsWriter(config.run_dir, enable_tensorboard=config.enable_tensorboard,
                                     total_steps=config.steps, is_primary=is_primary)
  with writer:
    pending = None  # (step, device metrics, host metrics) of the last step, fetched after the next one is dispatched
    last_time, last_logged = time.perf_counter(), start_step

    def rl_evaluate(step: int) -> None:
      results = rl.evaluate(averaged(state))
      if results and "ema" in state:  # the weights being trained, beside their average
        results["eval/policy_accuracy"] = rl.evaluate(state)["eval/accuracy"]
      summary.update(results)
      if results:
        writer.write(step, results)

    if rl is not None and start_step == 0:
      rl_evaluate(0)

    def flush(step: int, device_metrics, host_metrics: dict) -> None:
      nonlocal last_time, last_logged
      host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
      if hasattr(mode, "host_metrics"):
        host = mode.host_metrics(host)
      host.update(host_metrics)
      now = time.perf_counter()
      step_time = (now - last_time) / max(step - last_logged, 1)
      last_time, last_logged = now, step
      host.update(step_time=step_time, tokens_per_sec=tokens_per_step / step_time)
      if rl is None:  # RL iterators yield prompts: nothing is truncated or packed
        host.update({f"data/{k}": v for k, v in pipeline.data_stats(train_iterator).items()})
      utilisation = metrics_lib.mfu(host["tokens_per_sec"] / config.num_devices, flops_per_token, peak)
      if utilisation is not None:
        host["mfu"] = utilisation
      writer.write(step, host)
      summary["loss"] = host["loss"]

    for step in range(start_step + 1, config.steps + 1):
      if rl is not None:
        local, rollout_metrics = rl.next_batch(state, step)
      else:
        local, rollout_metrics = next(train_iterator), {}
      if config.distill_on_policy:
        local = on_policy.resample(config, setup.graphdef, setup.plain_params(state), tokenizer, local, step)
      if reference_table is not None:
        local = reference.attach(local, reference_table)
      batch = to_device_batch(local, config, setup.train_batch_sharding, accumulate=True)
      state, step_metrics = setup.train_step(state, batch)
      if pending is not None:
        flush(*pending)
        pending = None
      if step % config.log_period == 0 or step in (start_step + 1, config.steps) or rollout_metrics:
        pending = (step, step_metrics, rollout_metrics)
      writer.advance(step)
      eval_now = (config.eval_interval and step % config.eval_interval == 0) or step == config.steps
      if eval_now and (eval_batches or rl is not None):
        if pending is not None:
          flush(*pending)
          pending = None
        if rl is not None:
          rl_evaluate(step)
        else:
          eval_metrics = evaluate(setup.eval_step, averaged(state), eval_batches)
          summary["eval_loss"] = eval_metrics["eval/loss"]
          writer.write(step, eval_metrics)
      if checkpointer and (step % config.checkpoint_period == 0 or step == config.steps):
        checkpointer.save(step, state, train_iterator, {"step": step, "run_name": config.run_name, "peft": config.peft,
                                                        "base": starting_point(config)})
    if pending is not None:
      flush(*pending)

  summary["steps"] = int(jax.device_get(state["step"]))
  if config.export_hf_path:
    export.write(config, setup.model_config, setup.plain_params(averaged(state)), config.export_hf_path)
    summary["export_hf_path"] = config.export_hf_path
  # A value model has no use for its output head: nothing to sample.
  summary["sample"] = _sample(config, setup.graphdef, setup.plain_params(averaged(state)), tokenizer) \
      if config.sample_max_new_tokens and not setup.value_model else None
  return summary


def _sample(config, graphdef, params, tokenizer) -> dict[str, str]:
  """Greedy completion of the first eval prompt (or a training prompt when there is no eval set)."""
  if config.mode in RL_MODES:
    prompts = rl_data.eval_prompts(config, tokenizer) or [next(rl_data.make_prompt_iterator(config, tokenizer))]
    prompt = prompts[0].prompt
  else:
    prompt = (preference if config.mode in PREFERENCE_MODES else pipeline).sample_prompt(config)
  ids = pipeline.prompt_ids(config, tokenizer, prompt)
  greedy = SamplingParams(max_new_tokens=config.sample_max_new_tokens, eos_ids=sampler.eos_ids_of(tokenizer))
  completion = sampler.Sampler(graphdef, params, tokenizer, batch_size=1).generate([ids], greedy)[0][0]
  return {"prompt": prompt, "completion": completion.text}


def run(argv: list[str]) -> dict[str, Any]:
  """Loads the config from argv (without the program name), trains, and prints where everything is."""
  config = config_lib.load(argv)
  diagnostics = diagnostic_configuration.DiagnosticConfig(debug_config=debug_configuration.DebugConfig(
      stack_trace_config=stack_trace_configuration.StackTraceConfig(
          collect_stack_trace=config.collect_stack_trace, stack_trace_to_cloud=config.stack_trace_to_cloud,
          stack_trace_interval_seconds=config.stack_trace_interval_seconds)))
  with diagnostic.diagnose(diagnostics):
    summary = train(config)
  if config.process_index == 0:
    print(f"\nrun directory: {config.run_dir}")
    if config.enable_checkpointing:
      print(f"checkpoints:   {config.checkpoint_dir}")
    print(f"metrics:       {config.metrics_file}")
    if config.enable_tensorboard:
      print(f"tensorboard:   tensorboard --logdir {config.tensorboard_dir}")
    if config.export_hf_path:
      print(f"hugging face:  {config.export_hf_path}")
    if summary.get("sample"):
      print(f"sample prompt:     {summary['sample']['prompt']!r}")
      print(f"sample completion: {summary['sample']['completion']!r}")
  return summary


def main(argv: list[str]) -> None:
  if not flags.FLAGS["verbosity"].present:
    # Orbax and grain log every file operation at INFO; show warnings unless --verbosity asks for more.
    logging.set_verbosity(logging.WARNING)
  try:
    run(list(argv[1:]))
  except UserError as e:
    print(f"tunix_core: error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
