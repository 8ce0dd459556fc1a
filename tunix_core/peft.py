"""LoRA and QLoRA on THE decoder, built on qwix.

qwix attaches adapters by intercepting `jnp.einsum` while a decoder layer runs: for each projection
`einsum(eq, x, W)` whose module path matches `lora_targets`, it adds `alpha / rank * einsum(x, A, B)`
(A: [contracting dims..., rank], B: [rank, output dims...]); for QLoRA W is stored quantized (nf4, int4 or
int8, one scale per `qlora_tile_size` consecutive elements of its contracting dimensions, per output
channel) and dequantized inside the einsum. The adapter product is never materialised as a weight, so the backward
pass never forms a full weight gradient.

How it fits THE decoder:
  * Interception wraps each DecoderLayer's `__call__` (not the Transformer's: training calls
    `hidden_states`/`logits`), and only `jnp.einsum` is intercepted; Pallas kernels run uninterrupted.
  * scan_layers=true works: the adapters (and the quantized weights) are created once, abstractly, on one
    layer (`_discover`), then stacked along "layers" like the base weights, so the scanned layer finds
    them in its slice of the stacked state instead of creating them inside the scan.
  * A projection is recognised by following the traced weight operand back to the module's parameter
    (through `[...]` and `.astype`); for QLoRA the quantized value is followed the same way (qwix's own
    lookup falls back to shapes there, which cannot tell key from value or wi_0 from wi_1).
  * Every projection must be a `jnp.einsum` on the weight: a matmul written with `@` is invisible to the
    interception, and `lora_model` raises a UserError naming it.

State layout (all pure dicts, like the full model's params):
  trainable  adapters only: {"layers": {"attention": {"query_lora_a": ..., "query_lora_b": ...}, ...}}
  frozen     every base parameter, targeted projections quantized for QLoRA
             ({"query": {"array": {"qvalue": uint4/int4/int8, "scale": ...}}})
  `model(lm, frozen, trainable)` is the nnx model for a forward pass.
"""

import dataclasses
import math
import re
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import qwix
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from qwix._src import qconfig
from qwix._src.core import einsum as qwix_einsum
from qwix._src.core import einsum_info, qarray
from qwix._src.providers import lora as qwix_lora
from qwix._src.providers import ptq
from qwix._src.utils import flax_util

from tunix_core import models
from tunix_core.errors import UserError
from tunix_core.models.hf_weights import get_path
from tunix_core.models.transformer import DecoderLayer, ModelConfig

METHODS = ("lora", "qlora")
PROJECTIONS = ("query", "key", "value", "out", "wi_0", "wi_1", "wo")  # the weights an adapter can attach to
QTYPES = {"nf4": "nf4", "int4": jnp.int4, "int8": jnp.int8}
LORA_A, LORA_B = "_lora_a", "_lora_b"


@dataclasses.dataclass(frozen=True)
class PeftConfig:
  """What the run config asks for: method lora|qlora, rank, alpha, target regex, qlora dtype and tile."""
  method: str = "lora"
  rank: int = 8
  alpha: float = 16.0
  targets: str = ".*(attention|mlp).*"
  qlora_dtype: str = "nf4"
  tile_size: int = 64

  @property
  def quantized(self) -> bool:
    return self.method == "qlora"

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @classmethod
  def from_config(cls, config) -> "PeftConfig | None":
    """The run config's peft section; None for peft=none (full fine-tuning)."""
    if config.peft == "none":
      return None
    return cls(method=config.peft, rank=config.lora_rank, alpha=config.lora_alpha, targets=config.lora_targets,
               qlora_dtype=config.qlora_dtype, tile_size=config.qlora_tile_size)

  def __post_init__(self):
    if self.method not in METHODS:
      raise UserError(f"peft={self.method!r}: expected one of none, {', '.join(METHODS)}")
    if self.quantized and self.qlora_dtype not in QTYPES:
      raise UserError(f"qlora_dtype={self.qlora_dtype!r}: expected one of {', '.join(QTYPES)}")
    try:
      re.compile(self.targets)
    except re.error as e:
      raise UserError(f"lora_targets={self.targets!r} is not a valid regular expression ({e})") from None


@dataclasses.dataclass(frozen=True)
class Target:
  """One adapted projection."""
  path: tuple            # the weight's path in the plain params dict, e.g. ("layers", "attention", "query")
  shape: tuple           # the weight's shape there (with the leading layers axis when stacked)
  merge_equation: str    # einsum of (lora_a, lora_b) giving the weight's layout, e.g. "er,rhd->ehd"
  how: Any               # qwix HowToQuantize of one layer's weight (None for plain LoRA)
  stacked: bool          # a leading layers axis (scan_layers)

  @property
  def lora_a(self) -> tuple:
    return self.path[:-1] + (self.path[-1] + LORA_A,)

  @property
  def lora_b(self) -> tuple:
    return self.path[:-1] + (self.path[-1] + LORA_B,)


class LoraModel(NamedTuple):
  """The LoRA model's graph, its two abstract states with shardings, and what was adapted."""
  graphdef: nnx.GraphDef
  abstract_trainable: dict     # pure dict of ShapeDtypeStructs: the adapters (nnx.LoRAParam)
  abstract_frozen: dict        # pure dict of ShapeDtypeStructs: the base (quantized projections for QLoRA)
  trainable_shardings: dict
  frozen_shardings: dict
  abstract_params: dict        # the plain model's params (what hf_weights.load / checkpoints / init give)
  param_shardings: dict
  targets: tuple[Target, ...]
  peft: PeftConfig
  model_config: ModelConfig


# ---------------------------------------------------------------------------------------------- qwix
@flax.struct.dataclass
class QuantizedWeight(ptq.WithAux):
  """qwix's WithAux (a QArray + how it was quantized) whose `.astype` works on a QArray (qwix's own raises
  "Unsupported type: QArray"), so the model's `self.query[...].astype(dt)` reads it: it sets the dtype the
  weight dequantizes to."""

  def astype(self, dtype):
    return self.replace(array=self.array.astype(dtype))


nnx.register_data_type(QuantizedWeight)


class _Provider(qwix_lora.LoraProvider):
  """qwix's LoraProvider with only `jnp.einsum` intercepted and projections found by their traced weight."""

  def __init__(self, peft: PeftConfig):
    super().__init__(module_path=peft.targets, rank=peft.rank, alpha=peft.alpha, op_names=("einsum",),
                     weight_qtype=QTYPES[peft.qlora_dtype] if peft.quantized else None,
                     tile_size=peft.tile_size if peft.quantized else None)
    self.peft = peft
    self.records: list | None = None  # filled while a layer is discovered

  def get_intercept_map(self):
    # The common entries (rule lookup, pallas_call runs uninterrupted) + einsum; no dot_general, dot or asarray.
    return {**qconfig.QuantizationProvider.get_intercept_map(self), "jax.numpy.einsum": self.einsum}

  def einsum(self, equation, *operands, **kwargs):
    rule, _ = self._get_current_rule_and_op_id("einsum")
    if not isinstance(rule, qwix_lora.LoraRule) or len(operands) != 2 or not isinstance(equation, str):
      return jnp.einsum(equation, *operands, **kwargs)
    module = flax_util.get_current_module()
    lhs, rhs = operands
    name = _weight_name(module, rhs)
    if name is None:  # activations (attention scores), or a weight of another module
      if isinstance(rhs, ptq.WithAux):
        raise RuntimeError(f"a quantized weight reached einsum {equation!r} in {_path(module)} unrecognised")
      return jnp.einsum(equation, *operands, **kwargs)
    info = einsum_info.EinsumInfo.parse(equation, ndims=(lhs.ndim, rhs.ndim))
    how = None
    if self.peft.quantized:
      if isinstance(rhs, ptq.WithAux):
        quantized = rhs.array
      else:  # first (abstract) call: replace the module's weight by its quantized form
        how = self._how(module, name, info, tuple(rhs.shape))
        quantized = _replace_by_quantized(module, name, rhs, how)
      base = qwix_einsum.einsum(equation, lhs, quantized, **kwargs)
    else:
      base = jnp.einsum(equation, lhs, rhs, **kwargs)
    # pylint: disable=protected-access
    a_shape, b_shape, lora_equation, a_transpose, b_transpose = qwix_lora._parse_einsum_str_for_lora(
        lhs.shape, rhs.shape, equation, rule.rank)
    lora_a, lora_b = qwix_lora._get_or_create_lora_params(
        name=name, rule=rule, a_shape=a_shape, b_shape=b_shape, a_sharding_transpose=a_transpose,
        b_sharding_transpose=b_transpose)
    if self.records is not None:
      a_sub, b_sub = lora_equation.split("->")[0].split(",")[1:]
      self.records.append((tuple(module.qwix_path), name, tuple(rhs.shape), f"{a_sub},{b_sub}->{info.rhs}", how))
    delta = jnp.einsum(lora_equation, lhs, lora_a.astype(lhs.dtype), lora_b.astype(lhs.dtype), **kwargs)
    return base + (delta * self.peft.scale).astype(base.dtype)

  def _how(self, module, name: str, info, shape: tuple) -> qarray.HowToQuantize:
    """One scale per `tile_size` consecutive elements of the flattened contracting dimensions, per output
    channel: `out` [heads, head_dim, embed] with head_dim 32 and tile 64 gets one scale per 2 heads x 32.
    (qwix's default tiles only the last contracting axis and shares its scales across the others.)"""
    contracting = [i for i, c in enumerate(info.rhs) if c in info.contract_chars]
    tiles, left = {}, self.peft.tile_size
    for axis in reversed(contracting):
      size = shape[axis]
      if left == 1:
        break
      if left >= size and left % size == 0:
        tiles[axis], left = size, left // size
      elif size % left == 0:
        tiles[axis], left = left, 1
      else:
        break
    if left != 1:
      sizes = " x ".join(str(shape[i]) for i in contracting)
      raise UserError(f"qlora_tile_size={self.peft.tile_size} does not tile {_path(module)}/{name}'s contracting "
                      f"dimensions {sizes} (weight shape {shape}): it must divide the last of them, or be a "
                      f"multiple of it dividing their product; e.g. a power of two dividing {shape[contracting[-1]]}")
    return qarray.HowToQuantize(qtype=QTYPES[self.peft.qlora_dtype],
                                channelwise_axes=[i for i in range(len(shape)) if i not in tiles],
                                tiled_axes=tiles)


def _replace_by_quantized(module, name: str, value: jax.Array, how: qarray.HowToQuantize) -> qarray.QArray:
  """ptq.create_quantized_param with our QuantizedWeight: the module's weight becomes its quantized form, each
  array keeping the weight's sharding metadata."""
  quantized = qarray.quantize(value, how)
  param = getattr(module, name)
  boxed = jax.tree.map(lambda v: flax_util.update_boxed(param, value=v), QuantizedWeight(quantized, how))
  setattr(module, name, boxed)
  return quantized


def _path(module) -> str:
  return "/".join(map(str, getattr(module, "qwix_path", ())))


def _weight_name(module, x) -> str | None:
  """The name of `module`'s (possibly quantized) parameter that `x` was read from, following the traced
  value back through unary ops (`[...]`, `.astype`); None when x is not one of its parameters."""
  ids = {}
  for name, node in vars(module).items():
    if isinstance(node, nnx.LoRAParam):
      continue
    if isinstance(node, nnx.Param):
      ids[id(node.get_raw_value())] = name
    elif isinstance(node, ptq.WithAux):
      ids[id(flax_util.unbox(node.array.qvalue))] = name
  if isinstance(x, ptq.WithAux):
    x = x.array.qvalue
  while x is not None:
    if id(x) in ids:
      return ids[id(x)]
    parent = getattr(x, "parent", None) if isinstance(x, jax.core.Tracer) else None
    x = parent.in_tracers[0] if parent is not None and len(parent.in_tracers) == 1 else None
  return None


def _dummy_inputs(cfg: ModelConfig) -> tuple:
  length = 2
  return (jnp.zeros((1, length, cfg.emb_dim), cfg.dtype), jnp.arange(length, dtype=jnp.int32)[None],
          jnp.ones((1, length), jnp.int32), jnp.asarray(cfg.inv_frequencies()[0]), jnp.int32(0))


def _discover(cfg: ModelConfig, peft: PeftConfig, prefix: tuple) -> tuple[DecoderLayer, list]:
  """One abstract LoRA decoder layer (module paths `prefix/...`) and a record per adapted projection."""
  provider = _Provider(peft)
  records: list = []

  def make():
    inputs = _dummy_inputs(cfg)
    layer = qwix.apply_lora_to_model(DecoderLayer(cfg, rngs=nnx.Rngs(0)), provider, *inputs, rngs=nnx.Rngs(0),
                                     skip_nnx_init=True)
    for path, module in nnx.iter_modules(layer):
      module.qwix_path = prefix + tuple(path)
    layer.set_attributes(qwix_rngs=nnx.Rngs(0))
    provider.records = records
    try:
      layer(*inputs)
    finally:
      provider.records = None
    layer.set_attributes(qwix_rngs=None)
    return layer

  with nnx.use_eager_sharding(False):
    layer = nnx.eval_shape(make)
  expected = {(tuple(path), name) for path, module in nnx.iter_modules(layer)
              if re.fullmatch(peft.targets, "/".join(map(str, prefix + tuple(path))))
              for name in PROJECTIONS if name in vars(module)}
  found = {(r[0][len(prefix):], r[1]) for r in records}
  missing = sorted(expected - found)
  if missing:
    names = ", ".join("/".join(map(str, prefix + p + (n,))) for p, n in missing)
    raise UserError(f"lora_targets={peft.targets!r} selects {names}, but qwix cannot attach adapters there: "
                    f"LoRA sees projections written as jnp.einsum on the weight (not `@`); narrow lora_targets "
                    f"or change the model code")
  return layer, records


def _stack(layer: DecoderLayer, num_layers: int) -> DecoderLayer:
  """The abstract layer with every variable given a leading "layers" axis (what nnx.vmap makes)."""
  graphdef, state = nnx.split(layer)
  state = jax.tree.map(lambda v: v.copy(jax.ShapeDtypeStruct((num_layers, *v.shape), v.dtype)), state,
                       is_leaf=lambda x: isinstance(x, nnx.Variable))
  state = nnx.spmd.add_axis(state, 0, {nnx.PARTITION_NAME: "layers"})
  return nnx.merge(graphdef, state)


def _shardings(state, mesh: Mesh) -> dict:
  """NamedShardings by the active logical rules, replicating any dimension its mesh axes do not divide
  (quantization scales have few tiles along the tiled axis)."""
  specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
  shapes = nnx.to_pure_dict(state)

  def safe(spec: PartitionSpec, x) -> NamedSharding:
    entries = list(spec) + [None] * (len(x.shape) - len(spec))
    fixed = []
    for dim, entry in zip(x.shape, entries):
      axes = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
      fixed.append(entry if dim % math.prod(mesh.shape[a] for a in axes) == 0 else None)
    return NamedSharding(mesh, PartitionSpec(*fixed))

  return jax.tree.map(safe, specs, shapes, is_leaf=lambda s: isinstance(s, PartitionSpec))


# ------------------------------------------------------------------------------------------- the model
def lora_model(model_cfg: ModelConfig, peft: PeftConfig, mesh: Mesh) -> LoraModel:
  """The LoRA/QLoRA model's graph and abstract states with shardings (no memory used).

  Call inside `nnx.logical_axis_rules(rules)` (as train.build builds the plain model). Adapters are kept in
  the config's weight_dtype (computed in dtype); QLoRA scales in the compute dtype.
  """
  graphdef, abstract_state = models.abstract_model(model_cfg)
  abstract_params = nnx.to_pure_dict(abstract_state)
  param_shardings = models.param_shardings(abstract_state, mesh)
  model = nnx.merge(graphdef, abstract_state)
  if model_cfg.scan_layers:
    layer, records = _discover(model_cfg, peft, ("layers",))
    model.layers = _stack(layer, model_cfg.num_layers)
    records = [(r, True) for r in records]
  else:
    records, discovered = [], {}
    for i in range(model_cfg.num_layers):
      prefix = ("layers", i)
      relative = [tuple(path) for path, _ in nnx.iter_modules(model.layers[i])]
      matches = tuple(bool(re.fullmatch(peft.targets, "/".join(map(str, prefix + path)))) for path in relative)
      if matches in discovered:  # the same targets as an earlier layer: copy it instead of tracing again
        template, template_records = discovered[matches]
        layer = nnx.clone(template)
        for path, module in nnx.iter_modules(layer):
          module.qwix_path = prefix + tuple(path)
        layer_records = [(prefix + r[0][2:], *r[1:]) for r in template_records]
      else:
        layer, layer_records = _discover(model_cfg, peft, prefix)
        discovered[matches] = layer, layer_records
      model.layers[i] = layer
      records += [(r, False) for r in layer_records]
  if not records:
    raise UserError(f"lora_targets={peft.targets!r} matches no projection; module paths look like "
                    f"{'layers' if model_cfg.scan_layers else 'layers/0'}/attention and .../mlp "
                    f"(projections {', '.join(PROJECTIONS)})")
  targets = []
  for (module_path, name, shape, equation, how), stacked in records:
    if stacked:
      axis = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ") - set(equation))[0]
      inputs, w_sub = equation.split("->")
      a_sub, b_sub = inputs.split(",")
      equation = f"{axis}{a_sub},{axis}{b_sub}->{axis}{w_sub}"
      shape = (model_cfg.num_layers, *shape)
    targets.append(Target(path=(*module_path, name), shape=shape, merge_equation=equation, how=how,
                          stacked=stacked))
  lora_graphdef, trainable_state, frozen_state = nnx.split(model, nnx.LoRAParam, ...)
  abstract_trainable = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, model_cfg.weight_dtype),
                                    nnx.to_pure_dict(trainable_state))
  return LoraModel(graphdef=lora_graphdef, abstract_trainable=abstract_trainable,
                   abstract_frozen=nnx.to_pure_dict(frozen_state),
                   trainable_shardings=_shardings(trainable_state, mesh),
                   frozen_shardings=_shardings(frozen_state, mesh), abstract_params=abstract_params,
                   param_shardings=param_shardings, targets=tuple(targets), peft=peft, model_config=model_cfg)


def model(lm: LoraModel, frozen: dict, trainable: dict) -> nnx.Module:
  """The nnx model for a forward pass (inside jit; the train step differentiates w.r.t. `trainable`)."""
  return nnx.merge(lm.graphdef, frozen, trainable)


def num_adapter_params(lm: LoraModel) -> int:
  return models.num_params(lm.abstract_trainable)


def init_adapters(lm: LoraModel, seed: int) -> dict:
  """Fresh adapters in their shardings: lora_a he-uniform over its fan-in (qwix's default initializer, per
  layer), lora_b zero, so the LoRA model starts as its base. One uniform draw for all (one RNG to compile)."""
  def init() -> dict:
    shapes = [get_path(lm.abstract_trainable, t.lora_a).shape for t in lm.targets]
    sizes = [math.prod(shape) for shape in shapes]
    uniform = jax.random.uniform(jax.random.key(seed), (sum(sizes),), jnp.float32, -1.0, 1.0)
    flat, offset = {}, 0
    for t, shape, size in zip(lm.targets, shapes, sizes):
      fan_in = math.prod(shape[1 if t.stacked else 0:-1])
      a = uniform[offset:offset + size].reshape(shape) * math.sqrt(6.0 / fan_in)
      offset += size
      flat[t.lora_a] = a.astype(get_path(lm.abstract_trainable, t.lora_a).dtype)
      b = get_path(lm.abstract_trainable, t.lora_b)
      flat[t.lora_b] = jnp.zeros(b.shape, b.dtype)
    return traverse_util.unflatten_dict(flat)

  return jax.jit(init, out_shardings=lm.trainable_shardings)()


def _quantize(t: Target, weight: jax.Array, scale_dtype) -> dict:
  """A plain weight -> its frozen entry {"array": {"qvalue": ..., "scale": ...}}."""
  def one(w):
    q = qarray.quantize(w.astype(scale_dtype), t.how)
    fields = {"qvalue": q.qvalue, "scale": q.scale}
    if q.zero_point is not None:
      fields["zero_point"] = q.zero_point
    return fields
  return {"array": jax.vmap(one)(weight) if t.stacked else one(weight)}


def frozen_from_params(lm: LoraModel, params: dict, donate: bool = False) -> dict:
  """The frozen base from plain model params (fresh init, hf_weights.load or a checkpoint, in
  lm.param_shardings): the targeted projections quantized for QLoRA, everything in lm.frozen_shardings.
  donate=True frees `params` (the unquantized leaves are reused in place)."""
  quantized = {t.path: t for t in lm.targets} if lm.peft.quantized else {}
  expected = traverse_util.flatten_dict(lm.abstract_frozen)

  def convert(params: dict) -> dict:
    flat = {}
    for path, w in traverse_util.flatten_dict(params).items():
      if path in quantized:
        scale_dtype = expected[path + ("array", "scale")].dtype
        for sub, v in traverse_util.flatten_dict(_quantize(quantized[path], w, scale_dtype)).items():
          flat[path + sub] = v
      else:
        flat[path] = w
    if set(flat) != set(expected):
      raise UserError(f"params do not match the LoRA model's base: {sorted(set(flat) ^ set(expected))[:4]}")
    return traverse_util.unflatten_dict({p: v.astype(expected[p].dtype) for p, v in flat.items()})

  return jax.jit(convert, out_shardings=lm.frozen_shardings, donate_argnums=(0,) if donate else ())(params)


def merge(lm: LoraModel, frozen: dict, trainable: dict) -> dict:
  """Plain model params with the adapters folded in, W + alpha/rank * A B (QLoRA: W dequantized), in the
  weight dtype and lm.param_shardings: what export.write takes for a merged Hugging Face checkpoint."""
  by_path = {t.path: t for t in lm.targets}
  abstract = traverse_util.flatten_dict(lm.abstract_params)

  def fold(frozen: dict, trainable: dict) -> dict:
    flat = traverse_util.flatten_dict(frozen)
    out = {}
    for path in abstract:
      t = by_path.get(path)
      if t is None:
        out[path] = flat[path].astype(abstract[path].dtype)
        continue
      if lm.peft.quantized:
        q = qarray.QArray(qvalue=flat[path + ("array", "qvalue")], scale=flat[path + ("array", "scale")],
                          zero_point=flat.get(path + ("array", "zero_point")), qtype=t.how.qtype)
        weight = qarray.dequantize(q).astype(jnp.float32)
      else:
        weight = flat[path].astype(jnp.float32)
      a = get_path(trainable, t.lora_a).astype(jnp.float32)
      b = get_path(trainable, t.lora_b).astype(jnp.float32)
      delta = jnp.einsum(t.merge_equation, a, b, precision=jax.lax.Precision.HIGHEST)
      out[path] = (weight + lm.peft.scale * delta).astype(abstract[path].dtype)
    return traverse_util.unflatten_dict(out)

  return jax.jit(fold, out_shardings=lm.param_shardings)(frozen, trainable)


def adapters_off(trainable: dict) -> dict:
  """The adapters with every lora_b zeroed: the LoRA model then computes exactly its base (x A 0 = 0), with
  the same graph and no second copy of the weights (DPO's reference model)."""
  flat = traverse_util.flatten_dict(trainable)
  return traverse_util.unflatten_dict(
      {p: jnp.zeros_like(v) if p[-1].endswith(LORA_B) else v for p, v in flat.items()})
