"""Random-access record sources for grain: JSONL, Parquet and tfds. Each record is a dict.

`source.name` says where the records come from in config terms (e.g. "dataset_path=train.jsonl"), for messages.

A record must hold the messages field, or both the prompt and the completion field (field names from the
config). JSONL files are checked whole at construction; Parquet and tfds records when they are read.
"""

import dataclasses
import json
import os

import ml_collections
import numpy as np
import pyarrow.parquet as pq

from tunix_core.errors import UserError


@dataclasses.dataclass(frozen=True)
class Fields:
  """The record fields an example is made from."""
  prompt: str
  completion: str
  messages: str

  def problem(self, record) -> str | None:
    """Why `record` cannot be an example, or None when it can."""
    if not isinstance(record, dict):
      return f"expected a JSON object, got {type(record).__name__}"
    messages = record.get(self.messages)
    if messages is not None:
      if not isinstance(messages, list) or not all(
          isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
          for m in messages):
        return f"'{self.messages}' must be a list of {{\"role\": str, \"content\": str}}"
      return None
    if record.get(self.prompt) is None or record.get(self.completion) is None:
      return (f"the record has neither '{self.messages}' nor both '{self.prompt}' and '{self.completion}' "
              "(set prompt_field/completion_field/messages_field to its field names)")
    if not isinstance(record[self.prompt], str) or not isinstance(record[self.completion], str):
      return f"'{self.prompt}' and '{self.completion}' must be strings"
    return None


def _check_file(key: str, path: str) -> None:
  if not os.path.isfile(path):
    raise UserError(f"{key}={path}: no such file (relative to {os.getcwd()}); point {key} at an existing file")


class JsonlSource:
  """One JSON object per line. Construction parses every line once and keeps only byte offsets."""

  def __init__(self, path: str, fields: Fields, key: str = "dataset_path"):
    _check_file(key, path)
    self._path = path
    starts, ends, offset = [], [], 0
    with open(path, "rb") as f:
      for line_number, line in enumerate(f, start=1):
        if line.strip():
          try:
            problem = fields.problem(json.loads(line))
          except ValueError as e:
            problem = f"not valid JSON ({e})"
          if problem:
            raise UserError(f"{key}={path}, line {line_number}: {problem}")
          starts.append(offset)
          ends.append(offset + len(line))
        offset += len(line)
    self._starts, self._ends = np.array(starts, np.int64), np.array(ends, np.int64)
    self.name = f"{key}={path}"

  def __len__(self) -> int:
    return len(self._starts)

  def __getitem__(self, index: int) -> dict:
    # Opening per record (microseconds) keeps the source stateless: safe to share across reader threads and
    # to pickle into worker processes.
    start = int(self._starts[index])
    with open(self._path, "rb") as f:
      f.seek(start)
      return json.loads(f.read(int(self._ends[index]) - start))


class ParquetSource:
  """A Parquet file, read whole into an Arrow table (zero-copy columns; rows materialised on access)."""

  def __init__(self, path: str, fields: Fields, key: str = "dataset_path"):
    _check_file(key, path)
    try:
      self._table = pq.read_table(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
      raise UserError(f"{key}={path}: not a readable Parquet file ({e})") from e
    self._fields = fields
    self.name = f"{key}={path}"

  def __len__(self) -> int:
    return self._table.num_rows

  def __getitem__(self, index: int) -> dict:
    record = self._table.slice(index, 1).to_pylist()[0]
    problem = self._fields.problem(record)
    if problem:
      raise UserError(f"{self.name}, row {index}: {problem}")
    return record


def _to_str(value):
  """tfds gives text as bytes (also inside nested features); the pipeline wants str."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, dict):
    return {k: _to_str(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.dtype == object):
    return [_to_str(v) for v in value]
  return value


class TfdsSource:
  """A split of a prepared tfds dataset, through `tfds.data_source` (ArrayRecord, no TensorFlow needed)."""

  def __init__(self, name: str, split: str, data_dir: str, fields: Fields):
    import tensorflow_datasets as tfds  # heavy and optional: only tfds users pay for the import

    if not name:
      raise UserError("dataset_type=tfds needs dataset_name (e.g. dataset_name=my_dataset:1.0.0)")
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir or None)
    except Exception as e:  # tfds raises many types (not found, bad split, not prepared); all are the user's to fix
      first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise UserError(f"dataset_name={name}, split={split}, dataset_path={data_dir or '(tfds default)'}: "
                      f"cannot open it as a prepared tfds data source: {first_line}") from e
    self._fields = fields
    self.name = f"dataset_name={name}, split={split}"

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    record = _to_str(self._source[index])
    problem = self._fields.problem(record)
    if problem:
      raise UserError(f"{self.name}, record {index}: {problem}")
    return record


def make_source(config: ml_collections.FrozenConfigDict, split: str, fields=None
                ) -> JsonlSource | ParquetSource | TfdsSource | None:
  """The training (`split="train"`) or evaluation (`split="eval"`) source; None when no eval set is configured.

  `fields` checks each record (default: SFT's prompt/completion or messages; preference data passes its own).
  """
  fields = fields or Fields(config.prompt_field, config.completion_field, config.messages_field)
  if config.dataset_type == "tfds":
    key = "train_split" if split == "train" else "eval_split"
  else:
    key = "dataset_path" if split == "train" else "eval_dataset_path"
  if not config[key]:
    if split == "eval":
      return None
    raise UserError(f"{key} is empty; set it to the data to train on")
  if config.dataset_type == "tfds":
    return TfdsSource(config.dataset_name, config[key], config.dataset_path, fields)
  source_class = ParquetSource if config.dataset_type == "parquet" else JsonlSource
  return source_class(config[key], fields, key)
