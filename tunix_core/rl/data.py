"""Prompt data for the RL modes: JSONL/Parquet/tfds records with a prompt (text, or chat `messages` whose last
assistant turn, if any, is left out) plus any columns the reward functions read (e.g. `answer`).

Rollouts are one computation over the whole mesh, so every process reads the same global order of prompts (a
seeded shuffle, new each epoch) and the rows are split between processes only when they become a training batch.
"""

import dataclasses

import grain
import ml_collections

from tunix_core.data import pipeline
from tunix_core.data.sources import Fields, make_source
from tunix_core.data.tokenizer import Tokenizer
from tunix_core.errors import UserError


@dataclasses.dataclass
class Prompt:
  """One prompt record: `prompt` as the reward functions see it (text or messages), its token ids, and its other
  columns."""
  prompt: str | list[dict]
  ids: list[int]
  columns: dict


class PromptFields(Fields):
  """A prompt record needs the prompt field or the messages field; a completion is optional."""

  def problem(self, record) -> str | None:
    if not isinstance(record, dict):
      return f"expected a JSON object, got {type(record).__name__}"
    if record.get(self.messages) is not None:
      return super().problem(record)
    if not isinstance(record.get(self.prompt), str):
      return (f"the record has neither '{self.messages}' nor a string '{self.prompt}' (set prompt_field/"
              "messages_field to its field names)")
    return None


def _fields(config) -> PromptFields:
  return PromptFields(config.prompt_field, config.completion_field, config.messages_field)


def _prompt_of(record: dict, config) -> str | list[dict]:
  messages = record.get(config.messages_field)
  if messages is None:
    return record[config.prompt_field]
  assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
  return messages[:assistant_turns[-1]] if assistant_turns else messages


class _Converter:
  """Record -> Prompt, or None when the prompt leaves no room for max_new_tokens in max_target_length."""

  def __init__(self, config, tokenizer: Tokenizer):
    self._config = config
    self._encode = pipeline.prompt_encoder(config, tokenizer)
    self._skip = {config.prompt_field, config.messages_field, config.completion_field}

  def __call__(self, record: dict) -> Prompt | None:
    prompt = _prompt_of(record, self._config)
    ids = self._encode(prompt)
    if len(ids) + self._config.max_new_tokens > self._config.max_target_length + 1:
      return None
    return Prompt(prompt, ids, {k: v for k, v in record.items() if k not in self._skip})


def make_prompt_iterator(config: ml_collections.FrozenConfigDict, tokenizer: Tokenizer) -> grain.DatasetIterator:
  """The endless, checkpointable iterator of training `Prompt`s (the same on every process). Prompts too long
  to leave max_new_tokens within max_target_length are skipped."""
  source = make_source(config, "train", _fields(config))
  if not len(source):
    raise UserError(f"{source.name} has no prompts")
  convert = _Converter(config, tokenizer)
  ds = grain.MapDataset.source(source)
  if config.data_shuffle:
    ds = ds.shuffle(seed=config.seed)
  ds = ds.repeat().map(convert)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)).filter(lambda p: p is not None))


def eval_prompts(config: ml_collections.FrozenConfigDict, tokenizer: Tokenizer) -> list[Prompt]:
  """The first eval_num_prompts (-1 = all) usable prompts of the eval set, in file order; [] without one."""
  source = make_source(config, "eval", _fields(config))
  if source is None:
    return []
  convert = _Converter(config, tokenizer)
  wanted = len(source) if config.eval_num_prompts < 0 else config.eval_num_prompts
  prompts = []
  for i in range(len(source)):
    if len(prompts) == wanted:
      break
    prompt = convert(source[i])
    if prompt is not None:
      prompts.append(prompt)
  return prompts
