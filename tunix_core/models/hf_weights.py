"""Hugging Face safetensors <-> our parameters, both ways, for every family.

Each of our parameters maps to one Hugging Face tensor (per layer) by a reshape and a transpose:
HF weights are [out, in] with heads fused into one dimension, ours keep heads apart ([embed, heads,
head_dim]). Loading reads, for each device, only the slice of each tensor that device holds (safetensors
slices of memory-mapped files, converted to the target dtype on the fly), so no process ever holds the
whole model twice. safetensors files contain raw arrays only: nothing is unpickled or executed.
"""

import dataclasses
import json
import math
import os
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import ml_dtypes
from safetensors.numpy import save_file

from tunix_core.errors import UserError
from tunix_core.models.transformer import ModelConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """How one HF tensor becomes one of our arrays: reshape to `split` (HF dims grouped by `groups`), then
  transpose by `perm`. `hf_name` has {i} for the layer index when the tensor is per layer."""
  ours: tuple[str, ...]
  hf_name: str
  groups: tuple[int, ...]   # how many of the split dims each HF dim holds
  perm: tuple[int, ...]

  def split(self, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    split = [0] * len(our_shape)
    for our_dim, split_dim in enumerate(self.perm):
      split[split_dim] = our_shape[our_dim]
    return tuple(split)

  def hf_shape(self, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    split, shape, start = self.split(our_shape), [], 0
    for count in self.groups:
      shape.append(math.prod(split[start:start + count]))
      start += count
    return tuple(shape)

  def to_hf(self, ours: np.ndarray) -> np.ndarray:
    return np.transpose(ours, np.argsort(self.perm)).reshape(self.hf_shape(ours.shape))

  def read(self, checkpoint: "_Checkpoint", name: str, our_shape: tuple[int, ...], index: tuple[slice, ...]
           ) -> np.ndarray:
    """The part `index` of our array, reading from the HF tensor slice only the rows and columns needed."""
    split = self.split(our_shape)
    split_index = [slice(None)] * len(split)
    for our_dim, split_dim in enumerate(self.perm):
      split_index[split_dim] = index[our_dim]
    hf_index, local_shape, inner_index, start = [], [], [], 0
    for count in self.groups:
      dims = range(start, start + count)
      outer = split_index[start].indices(split[start])
      inner = math.prod(split[d] for d in dims[1:])
      hf_index.append(slice(outer[0] * inner, outer[1] * inner))
      local_shape.extend([outer[1] - outer[0], *(split[d] for d in dims[1:])])
      inner_index.extend([slice(None), *(split_index[d] for d in dims[1:])])
      start += count
    block = checkpoint.read(name, tuple(hf_index)).reshape(local_shape)[tuple(inner_index)]
    return np.transpose(block, self.perm)


def layer_maps(cfg: ModelConfig) -> list[TensorMap]:
  traits = cfg.traits
  prefix = "model.layers.{i}."
  attention_in = (2, 1)     # HF [heads*head_dim, embed] -> ours [embed, heads, head_dim]
  maps = [
      TensorMap(("attention_norm", "scale"), prefix + "input_layernorm.weight", (1,), (0,)),
      TensorMap(("attention", "query"), prefix + "self_attn.q_proj.weight", attention_in, (2, 0, 1)),
      TensorMap(("attention", "key"), prefix + "self_attn.k_proj.weight", attention_in, (2, 0, 1)),
      TensorMap(("attention", "value"), prefix + "self_attn.v_proj.weight", attention_in, (2, 0, 1)),
      TensorMap(("attention", "out"), prefix + "self_attn.o_proj.weight", (1, 2), (1, 2, 0)),
      TensorMap(("mlp", "wi_0"), prefix + "mlp.gate_proj.weight", (1, 1), (1, 0)),
      TensorMap(("mlp", "wi_1"), prefix + "mlp.up_proj.weight", (1, 1), (1, 0)),
      TensorMap(("mlp", "wo"), prefix + "mlp.down_proj.weight", (1, 1), (1, 0)),
  ]
  if traits.sandwich_norm:
    maps += [
        TensorMap(("post_attention_norm", "scale"), prefix + "post_attention_layernorm.weight", (1,), (0,)),
        TensorMap(("mlp_norm", "scale"), prefix + "pre_feedforward_layernorm.weight", (1,), (0,)),
        TensorMap(("post_mlp_norm", "scale"), prefix + "post_feedforward_layernorm.weight", (1,), (0,)),
    ]
  else:
    maps.append(TensorMap(("mlp_norm", "scale"), prefix + "post_attention_layernorm.weight", (1,), (0,)))
  if traits.qkv_bias:
    maps += [TensorMap(("attention", f"{ours}_bias"), prefix + f"self_attn.{hf}_proj.bias", (2,), (0, 1))
             for ours, hf in (("query", "q"), ("key", "k"), ("value", "v"))]
  if traits.qk_norm:
    maps += [TensorMap(("attention", "query_norm", "scale"), prefix + "self_attn.q_norm.weight", (1,), (0,)),
             TensorMap(("attention", "key_norm", "scale"), prefix + "self_attn.k_norm.weight", (1,), (0,))]
  return maps


def _global_maps(cfg: ModelConfig) -> list[TensorMap]:
  maps = [TensorMap(("embedding",), "model.embed_tokens.weight", (1, 1), (0, 1)),
          TensorMap(("final_norm", "scale"), "model.norm.weight", (1,), (0,))]
  if not cfg.tied_embeddings:
    maps.append(TensorMap(("head",), "lm_head.weight", (1, 1), (1, 0)))
  return maps


# A value model's head (value_head.ValueModel, {"decoder", "value_head"} params) is Hugging Face
# *ForSequenceClassification's score: ours [E], theirs [num_labels = 1, E].
SCORE_MAP = TensorMap(("value_head",), "score.weight", (0, 1), (0,))


def get_path(tree: dict, path: tuple) -> Any:
  """tree[path[0]][path[1]]... for a nested params dict."""
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: tuple, value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def expected_tensors(cfg: ModelConfig, abstract_params: dict) -> dict[str, tuple[int, ...]]:
  """HF tensor name -> shape that a checkpoint of this model must hold."""
  expected = {m.hf_name: m.hf_shape(get_path(abstract_params, m.ours).shape) for m in _global_maps(cfg)}
  for i, (m, our_shape) in _per_layer(cfg, abstract_params):
    expected[m.hf_name.format(i=i)] = m.hf_shape(our_shape)
  return expected


def _per_layer(cfg: ModelConfig, abstract_params: dict) -> Iterator[tuple[int, tuple[TensorMap, tuple]]]:
  for m in layer_maps(cfg):
    for i in range(cfg.num_layers):
      layer = abstract_params["layers"] if cfg.scan_layers else abstract_params["layers"][i]
      shape = get_path(layer, m.ours).shape
      yield i, (m, shape[1:] if cfg.scan_layers else shape)


_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class _SafetensorsFile:
  """Reads tensor slices from a .safetensors file with positioned reads (no memory map).

  A memory map would keep every page it touched resident in this process until the file is closed,
  adding the checkpoint's size again to the peak; positioned reads leave only the parameters.
  The format is an 8-byte header length, a JSON header (dtype, shape, byte offsets), then raw data.
  """

  def __init__(self, path: str):
    self.path = path
    self._fd = os.open(path, os.O_RDONLY)
    size = os.fstat(self._fd).st_size
    length = int.from_bytes(os.pread(self._fd, 8, 0), "little") if size >= 8 else -1
    if not 0 < length <= size - 8:
      raise ValueError("truncated or not safetensors (bad header length)")
    header = json.loads(os.pread(self._fd, length, 8))
    header.pop("__metadata__", None)
    self._data_start = 8 + length
    self.entries = {}
    for name, entry in header.items():
      start, end = entry["data_offsets"]
      itemsize = np.dtype(_DTYPES.get(entry["dtype"], np.uint8)).itemsize
      if self._data_start + end > size or end - start != math.prod(entry["shape"]) * itemsize:
        raise ValueError(f"truncated or inconsistent at tensor {name}")
      self.entries[name] = entry

  def dtype_name(self, name: str) -> str:
    return self.entries[name]["dtype"]

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.entries[name]["shape"])

  def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    """tensor[index] (slices), reading only the rows of the first dimension that the index covers."""
    entry = self.entries[name]
    dtype, shape = np.dtype(_DTYPES[entry["dtype"]]), tuple(entry["shape"])
    if not shape:
      return np.frombuffer(os.pread(self._fd, dtype.itemsize, self._data_start + entry["data_offsets"][0]), dtype)
    first = range(*index[0].indices(shape[0]))
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    offset = self._data_start + entry["data_offsets"][0] + first.start * row_bytes
    rows = np.frombuffer(os.pread(self._fd, len(first) * row_bytes, offset), dtype).reshape(len(first), *shape[1:])
    return rows[(slice(None), *index[1:])]


class _Checkpoint:
  """The safetensors files of a Hugging Face directory, as one name -> tensor table."""

  def __init__(self, directory: str):
    self.directory = directory
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index_path):
      with open(index_path) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(directory, SINGLE_FILE)):
      files = [SINGLE_FILE]
    else:
      raise UserError(f"hf_path={directory}: no {SINGLE_FILE} or {INDEX_FILE}; expected a Hugging Face model "
                      f"directory saved with safetensors")
    self.names: dict[str, _SafetensorsFile] = {}
    for file in files:
      path = os.path.join(directory, file)
      try:
        opened = _SafetensorsFile(path)
      except (ValueError, OSError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise UserError(f"hf_path={directory}: cannot read {file} ({e}); the file is missing, truncated "
                        f"or not safetensors — download it again") from None
      self.names.update({name: opened for name in opened.entries})

  def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    return self.names[name].read(name, index)


def check(checkpoint: _Checkpoint, expected: dict[str, tuple[int, ...]], tied: bool) -> None:
  """One error listing every missing, unexpected, mis-shaped or non-float tensor."""
  problems = []
  missing = sorted(set(expected) - set(checkpoint.names))
  # A tied model ignores a stored lm_head (some exporters write the shared matrix twice).
  unexpected = sorted(set(checkpoint.names) - set(expected) - ({"lm_head.weight"} if tied else set()))
  if missing:
    problems.append(f"missing {', '.join(missing)}")
  if unexpected:
    problems.append(f"unexpected {', '.join(unexpected)}")
  for name in sorted(set(expected) & set(checkpoint.names)):
    shape, dtype = checkpoint.names[name].shape(name), checkpoint.names[name].dtype_name(name)
    if shape != expected[name]:
      problems.append(f"{name} has shape {list(shape)}, expected {list(expected[name])}")
    if dtype not in ("F32", "F16", "BF16", "F64"):
      problems.append(f"{name} has dtype {dtype}, expected a float type")
  if problems:
    raise UserError(f"hf_path={checkpoint.directory} does not match its config.json: {'; '.join(problems)}")


def load(directory: str, cfg: ModelConfig, abstract_params: dict, shardings: dict) -> dict:
  """Parameters from a Hugging Face directory, each built on its devices from the slices they hold."""
  checkpoint = _Checkpoint(directory)
  check(checkpoint, expected_tensors(cfg, abstract_params), cfg.tied_embeddings)
  params: dict = {}

  def build(path: tuple, reader) -> None:
    spec = get_path(abstract_params, path)
    sharding = get_path(shardings, path)
    cache: dict = {}

    def callback(index: tuple[slice, ...]) -> np.ndarray:
      key = tuple(s.indices(n) for s, n in zip(index, spec.shape))
      if key not in cache:  # devices holding the same replica share one read
        cache[key] = np.ascontiguousarray(reader(index), dtype=spec.dtype)
      return cache[key]

    _set(params, path, jax.make_array_from_callback(spec.shape, sharding, callback))

  for m in _global_maps(cfg):
    shape = get_path(abstract_params, m.ours).shape
    build(m.ours, lambda index, m=m, shape=shape: m.read(checkpoint, m.hf_name, shape, index))
  for m in layer_maps(cfg):
    if cfg.scan_layers:
      full_shape = get_path(abstract_params["layers"], m.ours).shape

      def read_layers(index, m=m, full_shape=full_shape):
        layers = range(*index[0].indices(full_shape[0]))
        return np.stack([m.read(checkpoint, m.hf_name.format(i=i), full_shape[1:], index[1:])
                         for i in layers])

      build(("layers", *m.ours), read_layers)
    else:
      for i in range(cfg.num_layers):
        shape = get_path(abstract_params["layers"][i], m.ours).shape
        build(("layers", i, *m.ours),
              lambda index, m=m, i=i, shape=shape: m.read(checkpoint, m.hf_name.format(i=i), shape, index))
  return params


def hf_tensors(cfg: ModelConfig, params: dict) -> Iterator[tuple[str, Any]]:
  """(HF name, our array or its layer slice) for every tensor, in checkpoint order; arrays stay lazy. A value
  model's params are written as *ForSequenceClassification's: the decoder without lm_head, then score.weight."""
  if "value_head" in params:
    yield from ((name, entry) for name, entry in hf_tensors(cfg, params["decoder"]) if name != "lm_head.weight")
    yield SCORE_MAP.hf_name, (SCORE_MAP, params["value_head"])
    return
  for m in _global_maps(cfg):
    yield m.hf_name, (m, get_path(params, m.ours))
  for i in range(cfg.num_layers):
    for m in layer_maps(cfg):
      if cfg.scan_layers:
        yield m.hf_name.format(i=i), (m, get_path(params["layers"], m.ours), i)
      else:
        yield m.hf_name.format(i=i), (m, get_path(params["layers"][i], m.ours))


def save(cfg: ModelConfig, params: dict, directory: str, dtype: Any, max_shard_bytes: int) -> list[str]:
  """Writes the parameters as HF safetensors (sharded above max_shard_bytes, with an index); returns the files.

  Each tensor is gathered to the host when its shard is written, so host memory holds one shard at a time.
  """
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  def host(entry) -> np.ndarray:
    m, array, *layer = entry
    value = np.asarray(multihost_utils.process_allgather(array, tiled=True))
    # safetensors writes an array's buffer as it lies in memory: it must be C-ordered, not a transposed view.
    return np.ascontiguousarray(m.to_hf(value[layer[0]] if layer else value), dtype=dtype)

  entries = list(hf_tensors(cfg, params))
  itemsize = np.dtype(dtype).itemsize
  shards, current, size = [], [], 0
  for name, entry in entries:
    m, array, *layer = entry
    nbytes = math.prod(array.shape[1:] if layer else array.shape) * itemsize
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append((name, entry))
    size += nbytes
  shards.append(current)
  is_primary = jax.process_index() == 0
  files = [SINGLE_FILE] if len(shards) == 1 else [
      f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
  weight_map, total = {}, 0
  for file, shard in zip(files, shards):
    tensors = {name: host(entry) for name, entry in shard}
    total += sum(t.nbytes for t in tensors.values())
    weight_map.update({name: file for name in tensors})
    if is_primary:
      save_file(tensors, os.path.join(directory, file), metadata={"format": "pt"})
  if is_primary and len(files) > 1:
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return files
