"""Preference (chosen/rejected) data: the checkpointable training iterator and the evaluation batches.

A record holds a prompt and two completions, the preferred one (config chosen_field) and the dispreferred one
(rejected_field), in one of three forms:
  text:      prompt_field a string, chosen/rejected strings: [BOS] + prompt + completion + [EOS], as SFT's
             prompt/completion examples (add_bos/add_eos apply).
  chat:      prompt_field a list of chat messages [{role, content}], chosen/rejected each an assistant message
             or a list of messages appended to the prompt, rendered by the same chat template as SFT's messages.
  implicit:  no prompt field, chosen/rejected whole conversations (lists of messages): the prompt is their
             longest common prefix of messages, as TRL's implicit-prompt format.
The loss mask (completion_only_loss=true) covers the completion only: its text for text records; for chat
records the tokens of the completion's assistant turns (assistant turns inside the prompt are not in the loss).

Every batch has SFT's keys and dtypes (`pipeline.FEATURES`), shaped [rows, max_target_length], one sequence per
row (no packing): rows alternate chosen, rejected, chosen, rejected... (row 2i is pair i's chosen sequence, row
2i+1 its rejected one), so any even-sized contiguous split of the rows keeps pairs together. The number of rows
per batch and per micro-batch must therefore be even. `pair_index` [rows] int32 names each row's record in the
source (-1 for padding), which is how precomputed reference log-probs (tunix_core/reference.py) find their rows.
For mode=rm the rows' inputs hold each whole sequence (one padding id is appended before the shift to inputs and
targets), because a reward model reads the sequence's last token.

Over-long pairs (either sequence longer than max_target_length + 1 ids): long_examples=truncate cuts both to
max_target_length + 1 ids, keeping the start of the prompt and the start of the completion (the whole prompt when
both completions fit after it, else at least half of the row; the same prompt cut for both); drop removes the
pair. A pair whose sequence has no loss token left (or under 2 ids) is dropped. Counters count pairs.

Training, in each process: source -> shuffle (seeded, a new order each epoch) -> repeat -> this process's pairs
(`pipeline._global_index` over pairs, m = pairs per process batch) -> tokenize both -> drop -> batch -> interleave
-> count. Without packing the rows of all processes, in process order, are exactly a one-process run's batch.
"""


import grain
import ml_collections
import numpy as np

from tunix_core.data import sources
from tunix_core.data.pipeline import FEATURES, ROW_FEATURES, _Counted, _Encoder, _example, _global_index, _padded_row
from tunix_core.data.pipeline import _ProcessSlice, _SkipDropped, data_stats, eval_batch_count
from tunix_core.data.tokenizer import Tokenizer
from tunix_core.errors import UserError

__all__ = ["make_preference_iterator", "make_preference_eval_batches", "make_preference_pass", "sequence_rows",
           "data_stats", "PreferenceFields"]

# One encoded sequence: token ids, per-id loss mask (1 = counts as a target), and the prompt's length in ids.
_Sequence = tuple[list[int], list[int], int]


def _messages_problem(field: str, messages) -> str | None:
  if not isinstance(messages, list) or not all(
      isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
    return f"'{field}' must be a list of {{\"role\": str, \"content\": str}}"
  return None


def _common_prefix(a: list, b: list) -> int:
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return n


class PreferenceFields:
  """The record fields a pair is made from; `problem` is what the sources check every record with."""

  def __init__(self, prompt: str, chosen: str, rejected: str):
    self.prompt, self.chosen, self.rejected = prompt, chosen, rejected

  @classmethod
  def from_config(cls, config: ml_collections.FrozenConfigDict) -> "PreferenceFields":
    return cls(config.prompt_field, config.chosen_field, config.rejected_field)

  def split(self, record: dict) -> tuple[str | list[dict], list, list]:
    """(prompt, chosen, rejected) of a valid record: the prompt text or messages; completions as text or as lists
    of messages to append to the prompt."""
    prompt, chosen, rejected = (record.get(f) for f in (self.prompt, self.chosen, self.rejected))
    if prompt is None:  # implicit prompt: the messages both conversations begin with
      n = _common_prefix(chosen, rejected)
      return chosen[:n], chosen[n:], rejected[n:]
    if isinstance(prompt, str):
      return prompt, chosen, rejected
    return prompt, *([c] if isinstance(c, dict) else c for c in (chosen, rejected))

  def problem(self, record) -> str | None:
    """Why `record` cannot be a pair, or None when it can."""
    if not isinstance(record, dict):
      return f"expected a JSON object, got {type(record).__name__}"
    missing = [f"'{f}'" for f in (self.chosen, self.rejected) if record.get(f) is None]
    if missing:
      return (f"the record has no {' and no '.join(missing)} (set chosen_field/rejected_field to its field names; "
              f"found {', '.join(map(repr, record)) or 'no fields'})")
    prompt, chosen, rejected = (record.get(f) for f in (self.prompt, self.chosen, self.rejected))
    if prompt is None:
      if not isinstance(chosen, list) or not isinstance(rejected, list):
        return (f"the record has no '{self.prompt}' (set prompt_field to its field name; it may be left out only "
                f"when '{self.chosen}' and '{self.rejected}' are whole conversations, lists of chat messages)")
      problem = _messages_problem(self.chosen, chosen) or _messages_problem(self.rejected, rejected)
    elif isinstance(prompt, str):
      if not isinstance(chosen, str) or not isinstance(rejected, str):
        return (f"'{self.prompt}' is text, so '{self.chosen}' and '{self.rejected}' must be strings too "
                "(or give the prompt as chat messages)")
      return None
    else:
      problem = _messages_problem(self.prompt, prompt)
      for field, completion in ((self.chosen, chosen), (self.rejected, rejected)):
        if problem is None and isinstance(completion, dict):
          problem = _messages_problem(field, [completion]) and (
            f"'{field}' must be a chat message {{\"role\": str, \"content\": str}} or a list of them")
        elif problem is None:
          problem = _messages_problem(field, completion)
    if problem:
      return problem
    _, *completions = self.split(record)
    for field, completion in zip((self.chosen, self.rejected), completions):
      if not any(m["role"] == "assistant" for m in completion):
        what = "after the messages it shares with the other completion" if prompt is None else "after the prompt"
        return f"'{field}' has no assistant message {what}: nothing to compare"
    return None


def _make_source(config: ml_collections.FrozenConfigDict, split: str):
  """As sources.make_source, checking records as preference pairs."""
  return sources.make_source(config, split, PreferenceFields.from_config(config))


class _PairEncoder(_Encoder):
  """Record -> the chosen and the rejected sequence, each (ids, loss mask per id, prompt length in ids).

  Text pairs are SFT prompt/completion examples; chat pairs are rendered as SFT renders messages (BOS/EOS only
  for the built-in template), with the loss on the completion's assistant turns only.
  """

  def __init__(self, config: ml_collections.FrozenConfigDict, tokenizer: Tokenizer):
    # The SFT encoder, on records of our own making: fixed field names, and always the completion-only mask, which
    # locates the completion; completion_only_loss=false then sets every mask entry.
    inner = ml_collections.FrozenConfigDict({
      "chat_template": config.chat_template, "tokenizer_path": config.tokenizer_path, "add_bos": config.add_bos,
      "add_eos": config.add_eos, "completion_only_loss": True, "prompt_field": "prompt",
      "completion_field": "completion", "messages_field": "messages"})
    super().__init__(inner, tokenizer)
    self._fields = PreferenceFields.from_config(config)
    self._every_token = not config.completion_only_loss
    self._whole_sequence = config.mode == "rm"

  def pair(self, record: dict) -> tuple[_Sequence, _Sequence]:
    prompt, chosen, rejected = self._fields.split(record)
    return self.sequence(prompt, chosen), self.sequence(prompt, rejected)

  def sequence(self, prompt: str | list[dict], completion: str | list[dict]) -> _Sequence:
    if isinstance(prompt, str):
      ids, mask = self({"prompt": prompt, "completion": completion})
    else:
      ids, mask = self._chat_sequence(list(prompt), list(completion))
    prompt_length = mask.index(1) if 1 in mask else len(ids)
    if self._every_token:
      mask = [1] * len(ids)
    if self._whole_sequence:
      # A reward model reads each sequence's last token (its EOS, with add_eos) from the rows' inputs, which hold
      # ids[:-1]: one padding id after the end puts the whole sequence there.
      ids, mask = ids + [self._tokenizer.pad_id], mask + [0]
    return ids, mask, prompt_length

  def _chat_sequence(self, prompt: list[dict], completion: list[dict]) -> tuple[list[int], list[int]]:
    messages = prompt + completion
    # Assistant turns in order; the prompt's are not in the loss. Each assistant message is one span (for a
    # template with {% generation %} blocks, one block per assistant message).
    text, spans = self._chat.assistant_spans(messages)
    assistant_turns = sum(m["role"] == "assistant" for m in messages)
    if len(spans) != assistant_turns:
      raise UserError(f"chat_template: its {{% generation %}} blocks mark {len(spans)} spans in a conversation with "
                      f"{assistant_turns} assistant messages, so the completion cannot be told from the prompt; use "
                      "a template with one block per assistant message")
    spans = spans[sum(m["role"] == "assistant" for m in prompt):]
    ids, offsets = self._tokenizer.encode_with_offsets(text)
    mask, s = [], 0
    for start, end in offsets:  # as ChatTemplate.tokenize, over the completion's spans only
      while s < len(spans) and spans[s][1] <= start:
        s += 1
      inside = s < len(spans) and (max(start, spans[s][0]) < min(end, spans[s][1])
                                   or (start == end and spans[s][0] <= start < spans[s][1]))
      mask.append(int(inside))
    if not self._chat.is_builtin:  # the template writes BOS and end-of-turn tokens itself
      return ids, mask
    # EOS closes the conversation: a completion token when the assistant spoke last (as for SFT).
    bos, eos = self._bos(ids), [self._tokenizer.eos_id] if self._config.add_eos else []
    eos_mask = int(messages[-1]["role"] == "assistant")
    return bos + ids + eos, [0] * len(bos) + mask + [eos_mask] * len(eos)


def _fit(sequences: tuple[_Sequence, _Sequence], budget: int) -> list[tuple[list[int], list[int]]]:
  """Both sequences cut to `budget` ids: the prompt's start, then the completion's start. The prompt is kept
  whole when both completions fit after it, else it keeps max(budget // 2, room left by the longer completion)."""
  longest_completion = max(len(ids) - prompt_length for ids, _, prompt_length in sequences)
  out = []
  for ids, mask, prompt_length in sequences:
    keep = min(prompt_length, max(budget - longest_completion, budget // 2))
    rest = budget - keep
    out.append((ids[:keep] + ids[prompt_length:prompt_length + rest],
                mask[:keep] + mask[prompt_length:prompt_length + rest]))
  return out


def _pair_example(sequences: tuple[_Sequence, _Sequence], index: int, max_length: int, long_examples: str) -> dict:
  """The two padded rows of the source's pair `index`, stacked [2, max_length] per feature (pair_index [2]), with
  `num_truncated` and `drop`."""
  too_long = any(len(ids) > max_length + 1 for ids, _, _ in sequences)
  if too_long and long_examples == "drop":
    return {"num_truncated": 0, "drop": True}
  fitted = _fit(sequences, max_length + 1) if too_long else [(ids, mask) for ids, mask, _ in sequences]
  examples = [_example(ids, mask, max_length, long_examples) for ids, mask in fitted]
  if any(e["drop"] or not e["loss_mask"].any() for e in examples):  # nothing to compare
    return {"num_truncated": 0, "drop": True}
  rows = [_padded_row(e, max_length) for e in examples]
  pair = {key: np.stack([row[key] for row in rows]) for key in FEATURES}
  return {**pair, "pair_index": np.full(2, index, np.int32), "num_truncated": int(too_long), "drop": False}


def _interleave(batch: dict) -> dict:
  """[pairs, 2, length] -> [2 * pairs, length]: chosen, rejected, chosen, rejected, ... (pair_index likewise
  [pairs, 2] -> [2 * pairs])."""
  interleaved = {key: batch[key].reshape(-1, batch[key].shape[-1]) for key in FEATURES}
  interleaved.update({key: batch[key].reshape(-1) for key in ROW_FEATURES})
  return {**batch, **interleaved}


def _check_even(config: ml_collections.FrozenConfigDict, rows: int, what: str) -> None:
  if rows % 2:
    raise UserError(f"per_device_batch_size={config.per_device_batch_size} gives {rows} rows per {what}, but "
                    "preference data needs an even number: rows count chosen and rejected separately (a pair takes "
                    "two rows); choose per_device_batch_size so that it is even")


def make_preference_iterator(config: ml_collections.FrozenConfigDict,
                             tokenizer: Tokenizer) -> grain.DatasetIterator:
  """This process's endless iterator of preference batches of config.process_batch_size rows (pairs interleaved,
  see the module doc).

  The iterator's get_state/set_state round-trip exactly (grain.checkpoint.CheckpointSave/Restore), including the
  running totals of truncated and dropped pairs read by `data_stats` (= pipeline.data_stats).
  """
  rows, num_processes, length = config.process_batch_size, config.num_processes, config.max_target_length
  _check_even(config, rows, "process batch")
  _check_even(config, rows // config.gradient_accumulation_steps, "micro-batch in each process")
  source = _make_source(config, "train")
  pairs = rows // 2
  if len(source) < pairs * num_processes:
    raise UserError(f"{source.name} has {len(source)} pairs but one training batch needs {pairs * num_processes} "
                    f"({rows} rows = {pairs} pairs x {num_processes} processes); lower per_device_batch_size or "
                    "add data")
  encoder = _PairEncoder(config, tokenizer)
  # Indices rather than records go through the shuffle (the same permutation either way), so that every pair
  # knows its place in the source.
  ds = grain.MapDataset.range(len(source))
  if config.data_shuffle:
    ds = ds.shuffle(seed=config.seed)
  ds = _ProcessSlice(ds.repeat(), pairs, num_processes, config.process_index)
  ds = ds.map(lambda index: _pair_example(encoder.pair(source[index]), index, length, config.long_examples))
  give_up_after = len(source) * num_processes  # a streak this long: (nearly surely) every pair is dropped
  ds = _SkipDropped(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)), give_up_after)
  return iter(_Counted(ds.batch(pairs).map(_interleave)))


def make_preference_eval_batches(config: ml_collections.FrozenConfigDict,
                                 tokenizer: Tokenizer) -> list[dict[str, np.ndarray]]:
  """This process's evaluation batches of config.eval_batch_size rows (pairs interleaved), in file order; [] without
  an eval set.

  Every process gets the same number of batches, at most eval_steps (-1 = all); pairs past the end of the eval
  set, and pairs long_examples=drop would remove, are two padding rows with loss_mask 0.
  """
  source = _make_source(config, "eval")
  if source is None:
    return []
  if not len(source):
    raise UserError(f"{source.name} has no pairs; add some or disable evaluation")
  _check_even(config, config.eval_batch_size, "eval batch in each process")
  pairs = config.eval_batch_size // 2
  return _batches_in_file_order(config, tokenizer, source, pairs, eval_batch_count(config, len(source), pairs))


def make_preference_pass(config: ml_collections.FrozenConfigDict, tokenizer: Tokenizer,
                         split: str) -> tuple[int, list[dict[str, np.ndarray]]]:
  """(pairs in the split's source, this process's batches of config.eval_batch_size rows covering every pair once
  over all processes, in file order): the pass that precomputes reference log-probs. (0, []) without the split."""
  source = _make_source(config, split)
  if source is None:
    return 0, []
  _check_even(config, config.eval_batch_size, "batch in each process")
  pairs = config.eval_batch_size // 2
  num_batches = -(-len(source) // (pairs * config.num_processes))
  return len(source), _batches_in_file_order(config, tokenizer, source, pairs, num_batches)


def _batches_in_file_order(config, tokenizer: Tokenizer, source, pairs: int, num_batches: int) -> list[dict]:
  """This process's `num_batches` batches of `pairs` pairs, dealt by `_global_index`; pairs past the end of the
  source and dropped pairs are two padding rows (loss_mask 0, pair_index -1)."""
  length = config.max_target_length
  encoder = _PairEncoder(config, tokenizer)
  empty = _padded_row({"inputs": np.zeros(0, np.int32), "targets": np.zeros(0, np.int32),
                       "loss_mask": np.zeros(0, np.float32)}, length)
  padding = {**{key: np.stack([empty[key]] * 2) for key in FEATURES}, "pair_index": np.full(2, -1, np.int32)}
  batches = []
  for b in range(num_batches):
    batch_pairs = []
    for i in range(b * pairs, (b + 1) * pairs):
      j = _global_index(i, pairs, config.num_processes, config.process_index)
      pair = _pair_example(encoder.pair(source[j]), j, length, config.long_examples) if j < len(source) else None
      batch_pairs.append(padding if pair is None or pair["drop"] else pair)
    batches.append(_interleave({key: np.stack([p[key] for p in batch_pairs]) for key in (*FEATURES, *ROW_FEATURES)}))
  return batches


def sequence_rows(config: ml_collections.FrozenConfigDict, tokenizer: Tokenizer, prompts: list, completions: list
                  ) -> dict[str, np.ndarray]:
  """Rows [n, max_target_length] (FEATURES) of (prompt, completion) sequences, each encoded as training encodes one
  side of a pair (text or chat, as in the module doc); over-long ones keep the prompt's start and the completion's
  start, as long_examples=truncate. What a trained reward model scores."""
  encoder, length = _PairEncoder(config, tokenizer), config.max_target_length
  rows = []
  for prompt, completion in zip(prompts, completions, strict=True):
    sequence = encoder.sequence(prompt, [completion] if isinstance(completion, dict) else completion)
    ids, mask = _fit((sequence,), length + 1)[0] if len(sequence[0]) > length + 1 else sequence[:2]
    rows.append(_padded_row(_example(ids, mask, length, "truncate"), length))
  return {key: np.stack([row[key] for row in rows]) for key in FEATURES}


def sample_prompt(config: ml_collections.FrozenConfigDict) -> str | list[dict]:
  """The first eval pair's prompt (the first training pair's without an eval set), for pipeline.prompt_ids."""
  record = (_make_source(config, "eval") or _make_source(config, "train"))[0]
  return PreferenceFields.from_config(config).split(record)[0]
