"""Tokenizers: a SentencePiece .model or a Hugging Face tokenizer.json behind one small interface.

`encode` never adds BOS/EOS (the pipeline adds them per config); `decode` leaves out BOS, EOS and padding.
`bos_id`/`eos_id` (and `bos_token`/`eos_token`, their text for chat templates) are None when the
tokenizer has no such token; `pad_id` is 0 when it has no padding token.
"""

from collections.abc import Iterable
import json
import os
from typing import Protocol

import sentencepiece
import tokenizers

from tunix_core.errors import UserError

_EXPECTED = "expected a SentencePiece .model or a Hugging Face tokenizer.json (or a directory holding one)"
# Names BOS/EOS go by in common Hugging Face tokenizers, most specific first.
_BOS_NAMES = ("<|begin_of_text|>", "<bos>", "<s>", "<|startoftext|>")
_EOS_NAMES = ("<|end_of_text|>", "<eos>", "</s>", "<|endoftext|>")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>")


class Tokenizer(Protocol):
  """The interface the data pipeline and the sampler use."""

  bos_id: int | None
  eos_id: int | None
  pad_id: int
  bos_token: str | None
  eos_token: str | None
  vocab_size: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Iterable[int]) -> str: ...


class SentencePieceTokenizer:
  """A SentencePiece model; BOS/EOS/pad are the model's own control tokens."""

  def __init__(self, path: str):
    self._sp = sentencepiece.SentencePieceProcessor()
    try:
      self._sp.load(path)
    except (OSError, RuntimeError) as e:
      raise UserError(f"tokenizer_path={path}: not a readable SentencePiece model; {_EXPECTED}") from e
    self.vocab_size = self._sp.get_piece_size()
    self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
    self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
    self.pad_id = max(self._sp.pad_id(), 0)
    self.bos_token = self._sp.id_to_piece(self.bos_id) if self.bos_id is not None else None
    self.eos_token = self._sp.id_to_piece(self.eos_id) if self.eos_id is not None else None

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    # SentencePiece drops its control tokens (BOS, EOS, pad) itself.
    return self._sp.decode([int(i) for i in ids])


class HuggingFaceTokenizer:
  """A `tokenizers` tokenizer.json; BOS/EOS from a tokenizer_config.json beside it, else by common names."""

  def __init__(self, path: str):
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
      raise UserError(f"tokenizer_path={path}: not a readable tokenizer.json ({e}); {_EXPECTED}") from e
    vocab = self._tok.get_vocab(with_added_tokens=True)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    named = _config_tokens(os.path.join(os.path.dirname(path), "tokenizer_config.json"))

    def pick(key: str, names: tuple[str, ...]) -> str | None:
      if key in named:
        return named[key] if named[key] in vocab else None
      return next((name for name in names if name in vocab), None)

    self.bos_token, self.eos_token = pick("bos_token", _BOS_NAMES), pick("eos_token", _EOS_NAMES)
    pad_token = pick("pad_token", _PAD_NAMES)
    self.bos_id = vocab[self.bos_token] if self.bos_token else None
    self.eos_id = vocab[self.eos_token] if self.eos_token else None
    self.pad_id = vocab[pad_token] if pad_token else 0
    self._hidden = {i for i in (self.bos_id, self.eos_id, vocab.get(pad_token)) if i is not None}

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    # Only BOS/EOS/pad are hidden: chat markers are often special tokens too, and should stay visible.
    return self._tok.decode([int(i) for i in ids if int(i) not in self._hidden], skip_special_tokens=False)


def _config_tokens(path: str) -> dict[str, str | None]:
  """bos/eos/pad token strings from a Hugging Face tokenizer_config.json; {} when there is none."""
  if not os.path.isfile(path):
    return {}
  try:
    with open(path) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: not readable JSON ({e}); expected the tokenizer_config.json of the tokenizer") from e
  tokens = {}
  for key in ("bos_token", "eos_token", "pad_token"):
    if key in config:
      # Older files store an AddedToken dict instead of the plain string.
      value = config[key]
      tokens[key] = value.get("content") if isinstance(value, dict) else value
  return tokens


def load_tokenizer(path: str) -> Tokenizer:
  """The tokenizer at `path`: a SentencePiece .model, a tokenizer.json, or a directory holding either."""
  if os.path.isdir(path):
    for name in ("tokenizer.json", "tokenizer.model"):
      if os.path.isfile(os.path.join(path, name)):
        return load_tokenizer(os.path.join(path, name))
    raise UserError(f"tokenizer_path={path}: the directory holds no tokenizer.json or tokenizer.model; {_EXPECTED}")
  if not os.path.isfile(path):
    raise UserError(f"tokenizer_path={path}: no such file (relative to {os.getcwd()}); {_EXPECTED}")
  if path.endswith(".json"):
    return HuggingFaceTokenizer(path)
  return SentencePieceTokenizer(path)
