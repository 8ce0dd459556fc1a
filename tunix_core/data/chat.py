"""Chat messages -> token ids and a per-token loss mask, through a jinja2 chat template.

Works for any template whose renderings grow by appending, as Hugging Face templates do: render the
conversation up to each message boundary (and, before an assistant message, with the generation prompt),
cut the full text at those boundaries, tokenize each piece separately and mark the assistant pieces.
Tokenizing piece by piece makes the boundaries exact even where a tokenizer would merge across them,
and the sampler's prompt (`prompt_ids`) is cut the same way, so it matches what training saw.
"""

from collections.abc import Sequence

import jinja2
from jinja2 import sandbox

from tunix_core.data.tokenizer import Tokenizer
from tunix_core.errors import UserError

# Markers of the built-in template; the bundled tokenizer has each as a single token.
MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

# Renders "<|user|>\n{content}<|end|>\n<|assistant|>\n{content}<|end|>": the newline sits before each
# header, so an assistant turn is exactly its content plus "<|end|>", and the model learns to end a turn.
# Newlines are written as {{ '\\n' }} because trim_blocks would eat a literal one after a block tag.
BUILTIN_TEMPLATE = (
  "{% for message in messages %}"
  "{% if not loop.first %}{{ '\\n' }}{% endif %}"
  "<|{{ message['role'] }}|>{{ '\\n' }}{{ message['content'] }}<|end|>"
  "{% endfor %}"
  "{% if add_generation_prompt %}{% if messages %}{{ '\\n' }}{% endif %}<|assistant|>{{ '\\n' }}{% endif %}"
)


def _raise_exception(message: str):
  raise jinja2.TemplateError(message)


class ChatTemplate:
  """A compiled chat template bound to a tokenizer."""

  def __init__(self, template: str, tokenizer: Tokenizer):
    self._tokenizer = tokenizer
    # Sandboxed because templates come with downloaded checkpoints; options as Hugging Face renders them.
    env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
    try:
      self._template = env.from_string(template or BUILTIN_TEMPLATE)
    except jinja2.TemplateError as e:
      raise UserError(f"chat_template: not a valid jinja2 template ({e}); expected a Hugging Face style "
                      "chat template, or \"\" for the built-in one") from e
    self._bos, self._eos = tokenizer.bos_token or "", tokenizer.eos_token or ""

  def _render(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    try:
      return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                   bos_token=self._bos, eos_token=self._eos)
    except jinja2.TemplateError as e:
      raise UserError(f"chat_template: rendering {len(messages)} messages failed: {e}") from e

  def _pieces(self, messages: Sequence[dict], add_generation_prompt: bool) -> list[tuple[str, bool]]:
    """The rendered conversation cut at message boundaries, as (text, is_assistant_content) pieces."""
    boundaries = []
    for i, message in enumerate(messages):
      if message["role"] == "assistant":
        boundaries.append((self._render(messages[:i], True), False))
      boundaries.append((self._render(messages[:i + 1], False), message["role"] == "assistant"))
    if add_generation_prompt:
      boundaries.append((self._render(messages, True), False))
    pieces, done = [], ""
    for text, is_assistant in boundaries:
      if not text.startswith(done):
        raise UserError("chat_template: rendering a longer conversation changed the text of a shorter one; "
                        "expected a template that only appends, message by message")
      pieces.append((text[len(done):], is_assistant))
      done = text
    return pieces

  def tokenize(self, messages: Sequence[dict], completion_only_loss: bool) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and a 0/1 mask: 1 on assistant turns (on all if not completion_only_loss)."""
    ids, mask = [], []
    for text, is_assistant in self._pieces(messages, add_generation_prompt=False):
      piece = self._tokenizer.encode(text)
      ids += piece
      mask += [int(is_assistant or not completion_only_loss)] * len(piece)
    return ids, mask

  def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
    """Token ids of the conversation followed by the generation prompt, cut as `tokenize` cuts it."""
    return [i for text, _ in self._pieces(messages, add_generation_prompt=True) for i in self._tokenizer.encode(text)]
