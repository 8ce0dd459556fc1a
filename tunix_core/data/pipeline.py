"""grain pipelines: the checkpointable training iterator, the evaluation batches, and prompt tokenization.

Every batch is a dict of numpy arrays shaped [rows, max_target_length]: `inputs`, `targets`, `segment_ids`,
`positions` (int32) and `loss_mask` (float32). Per example, inputs/targets are ids[:-1]/ids[1:] before
packing; segment_ids number the examples of a row 1, 2, ... (0 is padding); positions restart at 0 in each.

Training, in each process:
  source -> shuffle (seeded, new order each epoch) -> repeat -> this process's examples -> tokenize
  -> to_iter_dataset -> drop over-long examples -> pack (first fit) or pad -> batch -> count.
Process p of P takes the examples at global positions j with (j // m) % P == p, m = process_batch_size, so
without packing the rows of all processes, in process order, are exactly a one-process run's global batch.
"""

from collections.abc import Callable
import math

import grain
import ml_collections
import numpy as np

from tunix_core.data.chat import ChatTemplate
from tunix_core.data.sources import make_source
from tunix_core.data.tokenizer import Tokenizer
from tunix_core.errors import UserError

FEATURES = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
# Per-row values ([rows]) a batch may carry beside FEATURES: preference rows name their pair's record in the source.
ROW_FEATURES = ("pair_index",)
_COUNTERS = ("num_truncated", "num_dropped")


def _global_index(i: int, block: int, num_processes: int, process_index: int) -> int:
  """Global position of a process's i-th example: blocks of `block` positions are dealt round-robin."""
  block_index, offset = divmod(i, block)
  return (block_index * num_processes + process_index) * block + offset


class _ProcessSlice(grain.MapDataset):
  """This process's examples of an (infinite) global order, by `_global_index`."""

  def __init__(self, parent: grain.MapDataset, block: int, num_processes: int, process_index: int):
    super().__init__(parent)
    self._args = (block, num_processes, process_index)

  def __len__(self) -> int:
    return len(self._parent)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[_global_index(index, *self._args)]

  def __str__(self) -> str:
    return f"_ProcessSlice(block={self._args[0]}, num_processes={self._args[1]}, process_index={self._args[2]})"


class _Encoder:
  """Record -> token ids and a per-id 0/1 mask saying whether that id, as a target, counts in the loss.

  Chat messages rendered by a Hugging Face template (config chat_template, or the tokenizer's own) are exactly
  transformers' apply_chat_template ids: the template writes BOS and end-of-turn tokens itself, so add_bos/add_eos
  apply only to prompt/completion records and to the built-in template.
  """

  def __init__(self, config: ml_collections.FrozenConfigDict, tokenizer: Tokenizer):
    self._config, self._tokenizer = config, tokenizer
    self._chat = ChatTemplate(config.chat_template, tokenizer)
    if self._chat.is_builtin:  # every record needs BOS/EOS: say so before reading any
      self._check_special_tokens()

  def _check_special_tokens(self):
    tokenizer = self._tokenizer
    for key, token_id, name in (("add_bos", tokenizer.bos_id, "BOS"), ("add_eos", tokenizer.eos_id, "EOS")):
      if self._config[key] and token_id is None:
        raise UserError(f"{key}=true but tokenizer_path={self._config.tokenizer_path} has no {name} token; "
                        f"set {key}=false")

  def _bos(self, ids: list[int]) -> list[int]:
    self._check_special_tokens()
    # A template may write BOS itself: never two.
    add = self._config.add_bos and ids[:1] != [self._tokenizer.bos_id]
    return [self._tokenizer.bos_id] if add else []

  def __call__(self, record: dict) -> tuple[list[int], list[int]]:
    config = self._config
    messages = record.get(config.messages_field)
    if messages is not None:
      ids, mask = self._chat.tokenize(messages, config.completion_only_loss)
      if not self._chat.is_builtin:
        return ids, mask
      # EOS closes the conversation: a completion token only when the assistant spoke last.
      eos_mask = int(not config.completion_only_loss or (bool(messages) and messages[-1]["role"] == "assistant"))
    else:
      prompt = self._tokenizer.encode(record[config.prompt_field])
      completion = self._tokenizer.encode(record[config.completion_field])
      ids = prompt + completion
      mask = [int(not config.completion_only_loss)] * len(prompt) + [1] * len(completion)
      eos_mask = 1
    bos, eos = self._bos(ids), [self._tokenizer.eos_id] if config.add_eos else []
    return bos + ids + eos, [0] * len(bos) + mask + [eos_mask] * len(eos)

  def prompt_ids(self, prompt: str | list[dict]) -> list[int]:
    if isinstance(prompt, str):
      ids = self._tokenizer.encode(prompt)
    else:
      ids = self._chat.prompt_ids(prompt)
      if not self._chat.is_builtin:
        return ids
    return self._bos(ids) + ids


def _example(ids: list[int], mask: list[int], max_length: int, long_examples: str) -> dict:
  """Shifted features of one example; `drop` marks one that is removed (too long, or nothing to predict)."""
  too_long = len(ids) > max_length + 1
  if too_long and long_examples == "truncate":
    ids, mask = ids[:max_length + 1], mask[:max_length + 1]
  drop = len(ids) < 2 or (too_long and long_examples == "drop")
  ids_array = np.asarray(ids, np.int32)
  return {"inputs": ids_array[:-1], "targets": ids_array[1:], "loss_mask": np.asarray(mask[1:], np.float32),
          "num_truncated": int(too_long and not drop), "drop": drop}


def _padded_row(example: dict, max_length: int) -> dict:
  """One example alone in a row; an empty example gives an all-padding row."""
  n = len(example["inputs"])
  row = {}
  for key in ("inputs", "targets", "loss_mask"):
    row[key] = np.zeros(max_length, example[key].dtype)
    row[key][:n] = example[key]
  row["segment_ids"] = (np.arange(max_length) < n).astype(np.int32)
  row["positions"] = np.where(row["segment_ids"] == 1, np.arange(max_length), 0).astype(np.int32)
  return row


def _packed_row(row: dict) -> dict:
  """Renames grain's packing features to the batch contract and totals the counters of the row's examples."""
  out = {key: row[key] for key in ("inputs", "targets", "loss_mask")}
  out["segment_ids"], out["positions"] = row["inputs_segment_ids"], row["inputs_positions"]
  for key in _COUNTERS:
    out[key] = sum(row[key])
  return out


class _SkipDropped(grain.IterDataset):
  """Removes examples marked `drop`; each kept example carries `num_dropped`, how many were removed before it."""

  def __init__(self, parent: grain.IterDataset, give_up_after: int):
    super().__init__(parent)
    self._give_up_after = give_up_after

  def __iter__(self) -> grain.DatasetIterator:
    return _SkipDroppedIterator(self._parent.__iter__(), self._give_up_after)


class _SkipDroppedIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, give_up_after: int):
    super().__init__(parent)
    self._give_up_after = give_up_after

  def __next__(self) -> dict:
    dropped = 0
    while (example := next(self._parent))["drop"]:
      dropped += 1
      if dropped >= self._give_up_after:
        raise UserError(f"{dropped} examples in a row were too long for max_target_length or had under 2 tokens; "
                        "raise max_target_length or set long_examples=truncate")
    example = {k: v for k, v in example.items() if k != "drop"}
    example["num_dropped"] = dropped
    return example

  def get_state(self) -> dict:
    return self._parent.get_state()

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state)


class _Counted(grain.IterDataset):
  """Top of the training pipeline: keeps running totals of truncated and dropped examples in its state."""

  def __iter__(self) -> grain.DatasetIterator:
    return _CountedIterator(self._parent.__iter__())


class _CountedIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)
    self.truncated = self.dropped = 0

  def __next__(self) -> dict:
    batch = next(self._parent)
    self.truncated += int(np.sum(batch["num_truncated"]))
    self.dropped += int(np.sum(batch["num_dropped"]))
    return {key: batch[key] for key in (*FEATURES, *ROW_FEATURES) if key in batch}

  def get_state(self) -> dict:
    return {"parent": self._parent.get_state(), "truncated": self.truncated, "dropped": self.dropped}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self.truncated, self.dropped = state["truncated"], state["dropped"]


def make_train_iterator(config: ml_collections.FrozenConfigDict, tokenizer: Tokenizer) -> grain.DatasetIterator:
  """This process's endless iterator of training batches of config.process_batch_size rows; see the module doc.

  The iterator's get_state/set_state round-trip exactly (grain.checkpoint.CheckpointSave/Restore), including the
  running totals read by `data_stats`.
  """
  source = make_source(config, "train")
  rows, num_processes, length = config.process_batch_size, config.num_processes, config.max_target_length
  if len(source) < rows * num_processes:
    raise UserError(f"{source.name} has {len(source)} examples but one training batch needs {rows * num_processes} "
                    f"({rows} rows x {num_processes} processes); lower per_device_batch_size or add data")
  encoder = _Encoder(config, tokenizer)
  ds = grain.MapDataset.source(source)
  if config.data_shuffle:
    ds = ds.shuffle(seed=config.seed)
  ds = _ProcessSlice(ds.repeat(), rows, num_processes, config.process_index)
  ds = ds.map(lambda record: _example(*encoder(record), length, config.long_examples))
  # Reading and tokenizing in the caller's thread measured 3x faster than grain's default 16 reader threads
  # (whose bookkeeping outweighs the work for local files) on a 2-core machine.
  # A streak this long means (nearly surely) that every example is dropped; without a limit it would spin forever.
  give_up_after = len(source) * num_processes
  ds = _SkipDropped(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)), give_up_after)
  if config.packing:
    ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct={"inputs": length, "targets": length, "loss_mask": length}, num_packing_bins=rows,
      seed=config.seed, shuffle_bins=config.data_shuffle, meta_features=_COUNTERS).map(_packed_row)
  else:
    ds = ds.map(lambda example: {**_padded_row(example, length), **{k: example[k] for k in _COUNTERS}})
  return iter(_Counted(ds.batch(rows)))


def data_stats(iterator: grain.DatasetIterator) -> dict[str, int]:
  """Examples truncated and dropped so far by a `make_train_iterator` iterator; kept in its checkpointed state.

  Counted as their batches are emitted; `dropped` also counts examples with under 2 tokens (nothing to predict).
  """
  return {"truncated": iterator.truncated, "dropped": iterator.dropped}


def eval_batch_count(config: ml_collections.FrozenConfigDict, num_items: int, items_per_batch: int) -> int:
  """Batches each process evaluates: enough for every item over all processes, at most eval_steps (-1 = all)."""
  num_batches = math.ceil(num_items / (items_per_batch * config.num_processes))
  return num_batches if config.eval_steps < 0 else min(num_batches, config.eval_steps)


def make_eval_batches(config: ml_collections.FrozenConfigDict, tokenizer: Tokenizer) -> list[dict[str, np.ndarray]]:
  """This process's evaluation batches of config.eval_batch_size rows, in file order; [] without an eval set.

  Every process gets the same number of batches, at most eval_steps (-1 = all); rows past the end of the
  eval set, and examples long_examples=drop would remove, are padding rows with loss_mask 0.
  """
  source = make_source(config, "eval")
  if source is None:
    return []
  if not len(source):
    raise UserError(f"{source.name} has no examples; add some or disable evaluation")
  rows, num_processes, length = config.eval_batch_size, config.num_processes, config.max_target_length
  num_batches = eval_batch_count(config, len(source), rows)
  encoder = _Encoder(config, tokenizer)
  empty = {"inputs": np.zeros(0, np.int32), "targets": np.zeros(0, np.int32), "loss_mask": np.zeros(0, np.float32)}
  batches = []
  for b in range(num_batches):
    batch_rows = []
    for i in range(b * rows, (b + 1) * rows):
      j = _global_index(i, rows, num_processes, config.process_index)
      example = _example(*encoder(source[j]), length, config.long_examples) if j < len(source) else None
      batch_rows.append(_padded_row(empty if example is None or example["drop"] else example, length))
    batches.append({key: np.stack([row[key] for row in batch_rows]) for key in FEATURES})
  return batches


def prompt_encoder(config: ml_collections.FrozenConfigDict, tokenizer: Tokenizer
                   ) -> Callable[[str | list[dict]], list[int]]:
  """`prompt_ids` with the chat template compiled once, for many prompts (RL rollouts)."""
  return _Encoder(config, tokenizer).prompt_ids


def prompt_ids(config: ml_collections.FrozenConfigDict, tokenizer: Tokenizer, prompt: str | list[dict]) -> list[int]:
  """The ids training puts before a completion: [BOS] + prompt, or for chat messages the conversation so far
  plus the template's generation prompt (for a Hugging Face template, transformers' apply_chat_template ids with
  add_generation_prompt=True). Feed them to the sampler to continue as training taught."""
  return _Encoder(config, tokenizer).prompt_ids(prompt)


def sample_prompt(config: ml_collections.FrozenConfigDict) -> str | list[dict]:
  """The first eval example's prompt (the first training example's without an eval set), for `prompt_ids`:
  its prompt text, or its messages before the last assistant turn."""
  record = (make_source(config, "eval") or make_source(config, "train"))[0]
  messages = record.get(config.messages_field)
  if messages is None:
    return record[config.prompt_field]
  assistant_turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
  return messages[:assistant_turns[-1]] if assistant_turns else messages
