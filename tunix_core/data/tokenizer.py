"""Tokenizers: a SentencePiece .model or a Hugging Face tokenizer.json behind one small interface.

A Hugging Face tokenizer directory works as it does in transformers: tokenizer.json (or tokenizer.model) with
tokenizer_config.json beside it, and optionally chat_template.jinja (which wins over tokenizer_config.json's
"chat_template", as in transformers 5) and special_tokens_map.json (read for keys tokenizer_config.json lacks).

`encode` never adds BOS/EOS (the pipeline adds them per config, or the chat template writes them); special
tokens written as text ("<|im_end|>", "<bos>") become their ids, as in transformers. `decode` leaves out BOS,
EOS and padding. `bos_id`/`eos_id` (and `bos_token`/`eos_token`, their text) are what tokenizer_config.json says
when it names them (None for `null`, as Qwen's bos_token), else the tokenizer's own; `pad_id` is 0 when there is
no padding token. `chat_template` is the directory's chat template (None without one) and `special_tokens_map`
the named special tokens a chat template sees as variables (bos_token, eos_token, pad_token, ...).
"""

from collections.abc import Iterable
import json
import os
import re
from typing import Protocol

import sentencepiece
import tokenizers

from tunix_core.errors import UserError

_EXPECTED = ("expected a SentencePiece .model or a Hugging Face tokenizer.json (or a directory holding one, with "
             "its tokenizer_config.json)")
# Names BOS/EOS go by in common Hugging Face tokenizers, most specific first; used without a tokenizer_config.json.
_BOS_NAMES = ("<|begin_of_text|>", "<bos>", "<s>", "<|startoftext|>")
_EOS_NAMES = ("<|end_of_text|>", "<eos>", "</s>", "<|endoftext|>")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>")


class Tokenizer(Protocol):
  """The interface the data pipeline, the chat templates and the sampler use."""

  bos_id: int | None
  eos_id: int | None
  pad_id: int
  bos_token: str | None
  eos_token: str | None
  vocab_size: int
  chat_template: str | None
  special_tokens_map: dict[str, str]

  def encode(self, text: str) -> list[int]: ...

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids of `text` (as `encode`) and each id's [start, end) character span in `text`."""
    ...

  def decode(self, ids: Iterable[int]) -> str: ...


class _HubFiles:
  """What a Hugging Face tokenizer directory says besides the vocabulary: named special tokens, chat template,
  added tokens. Empty when the directory has none of the files."""

  def __init__(self, directory: str):
    config = _read_json(os.path.join(directory, "tokenizer_config.json"))
    special_map = _read_json(os.path.join(directory, "special_tokens_map.json"))
    # Named special tokens: bos_token, eos_token, unk_token, pad_token, ... and family ones (Gemma 3's boi_token).
    # Older files store an AddedToken dict instead of the plain string.
    # transformers 5 also takes named ones from a dict "extra_special_tokens".
    self.named: dict[str, str | None] = {}
    for source in (special_map, config):
      extra = source.get("extra_special_tokens")
      for key, value in [*source.items(), *(extra.items() if isinstance(extra, dict) else ())]:
        if key.endswith("_token") and (value is None or isinstance(value, (str, dict))):
          self.named[key] = value.get("content") if isinstance(value, dict) else value
    self.added_tokens = [entry["content"] for entry in config.get("added_tokens_decoder", {}).values()
                         if isinstance(entry, dict) and "content" in entry]
    self.chat_template = self._chat_template(directory, config)

  @staticmethod
  def _chat_template(directory: str, config: dict) -> str | None:
    jinja_path = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja_path):
      with open(jinja_path, encoding="utf-8") as f:
        return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates, [{"name": ..., "template": ...}]: the default one
      named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
      if "default" not in named:
        raise UserError(f"{directory}/tokenizer_config.json has chat templates {sorted(map(str, named))} but no "
                        "'default' one; set chat_template to the template to use")
      template = named["default"]
    if template is not None and not isinstance(template, str):
      raise UserError(f"{directory}/tokenizer_config.json: chat_template is a {type(template).__name__}; "
                      "expected a jinja2 template string")
    return template


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: not readable JSON ({e}); expected the {os.path.basename(path)} of the tokenizer") from e
  if not isinstance(data, dict):
    raise UserError(f"{path}: expected a JSON object")
  return data


def _special_tokens_map(named: dict[str, str | None]) -> dict[str, str]:
  """The named special tokens, as transformers passes them to chat templates (tokenization_utils_base.py,
  `special_tokens_map`: the named ones that are not None)."""
  return {key: value for key, value in named.items() if value is not None}


class SentencePieceTokenizer:
  """A SentencePiece model; BOS/EOS/pad are the model's own control tokens unless tokenizer_config.json names others."""

  def __init__(self, path: str):
    self._sp = sentencepiece.SentencePieceProcessor()
    try:
      self._sp.load(path)
    except (OSError, RuntimeError) as e:
      raise UserError(f"tokenizer_path={path}: not a readable SentencePiece model; {_EXPECTED}") from e
    hub = _HubFiles(os.path.dirname(path))
    self.vocab_size = self._sp.get_piece_size()

    def piece_id(piece: str | None) -> int | None:
      if piece is None:
        return None
      i = self._sp.piece_to_id(piece)
      return i if self._sp.id_to_piece(i) == piece else None

    def own(i: int) -> str | None:
      return self._sp.id_to_piece(i) if i >= 0 else None

    self.bos_token = hub.named["bos_token"] if "bos_token" in hub.named else own(self._sp.bos_id())
    self.eos_token = hub.named["eos_token"] if "eos_token" in hub.named else own(self._sp.eos_id())
    self.bos_id, self.eos_id = piece_id(self.bos_token), piece_id(self.eos_token)
    self.bos_token = self.bos_token if self.bos_id is not None else None
    self.eos_token = self.eos_token if self.eos_id is not None else None
    pad_token = hub.named["pad_token"] if "pad_token" in hub.named else own(self._sp.pad_id())
    self.pad_id = piece_id(pad_token) or 0
    self.chat_template = hub.chat_template
    self.special_tokens_map = _special_tokens_map({"bos_token": self.bos_token, "eos_token": self.eos_token,
                                                   **hub.named})
    # SentencePiece itself matches user-defined pieces in text but not control ones (<bos>, </s>): split those out.
    specials = {self._sp.id_to_piece(i) for i in range(self.vocab_size) if self._sp.is_control(i)}
    specials |= {t for t in [*hub.added_tokens, *self.special_tokens_map.values()] if piece_id(t) is not None}
    specials.discard("")
    self._special_re = re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True)))) \
        if specials else None

  def _split(self, text: str) -> list[tuple[int, int, bool]]:
    """[start, end) stretches of `text`, each either plain text or one special token."""
    stretches, start = [], 0
    for match in (self._special_re.finditer(text) if self._special_re else ()):
      stretches += [(start, match.start(), False)] if match.start() > start else []
      stretches.append((match.start(), match.end(), True))
      start = match.end()
    return stretches + ([(start, len(text), False)] if start < len(text) else [])

  def encode(self, text: str) -> list[int]:
    ids = []
    for start, end, special in self._split(text):
      ids += [self._sp.piece_to_id(text[start:end])] if special else self._sp.encode(text[start:end])
    return ids

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    ids, offsets = [], []
    for start, end, special in self._split(text):
      if special:
        ids.append(self._sp.piece_to_id(text[start:end]))
        offsets.append((start, end))
      else:
        self._encode_plain(text, start, end, ids, offsets)
    return ids, offsets

  def _encode_plain(self, text: str, start: int, end: int, ids: list, offsets: list):
    piece = text[start:end]
    # SentencePiece reports byte offsets into the UTF-8 text; map them back to characters.
    char_at_byte = [0] * (len(piece.encode("utf-8")) + 1)
    position = 0
    for i, char in enumerate(piece):
      for _ in range(len(char.encode("utf-8"))):
        char_at_byte[position] = i
        position += 1
    char_at_byte[position] = len(piece)
    for p in self._sp.encode(piece, return_type="proto").pieces:
      ids.append(p.id)
      offsets.append((start + char_at_byte[p.begin], start + char_at_byte[p.end]))

  def decode(self, ids: Iterable[int]) -> str:
    # SentencePiece drops its control tokens (BOS, EOS, pad) itself.
    return self._sp.decode([int(i) for i in ids])


class HuggingFaceTokenizer:
  """A `tokenizers` tokenizer.json; BOS/EOS and the chat template from the files beside it, else by common names."""

  def __init__(self, path: str):
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
      raise UserError(f"tokenizer_path={path}: not a readable tokenizer.json ({e}); {_EXPECTED}") from e
    vocab = self._tok.get_vocab(with_added_tokens=True)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    hub = _HubFiles(os.path.dirname(path))

    def pick(key: str, names: tuple[str, ...]) -> str | None:
      if key in hub.named:
        return hub.named[key] if hub.named[key] in vocab else None
      return next((name for name in names if name in vocab), None)

    self.bos_token, self.eos_token = pick("bos_token", _BOS_NAMES), pick("eos_token", _EOS_NAMES)
    pad_token = pick("pad_token", _PAD_NAMES)
    self.bos_id = vocab[self.bos_token] if self.bos_token else None
    self.eos_id = vocab[self.eos_token] if self.eos_token else None
    self.pad_id = vocab[pad_token] if pad_token else 0
    self._hidden = {i for i in (self.bos_id, self.eos_id, vocab.get(pad_token)) if i is not None}
    self.chat_template = hub.chat_template
    self.special_tokens_map = _special_tokens_map({"bos_token": self.bos_token, "eos_token": self.eos_token,
                                                   **hub.named})

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    encoding = self._tok.encode(text, add_special_tokens=False)
    return encoding.ids, encoding.offsets

  def decode(self, ids: Iterable[int]) -> str:
    # Only BOS/EOS/pad are hidden: chat markers are often special tokens too, and should stay visible.
    return self._tok.decode([int(i) for i in ids if int(i) not in self._hidden], skip_special_tokens=False)


def load_tokenizer(path: str) -> Tokenizer:
  """The tokenizer at `path`: a SentencePiece .model, a tokenizer.json, or a directory holding either (tokenizer.json
  first) with its tokenizer_config.json / chat_template.jinja."""
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
