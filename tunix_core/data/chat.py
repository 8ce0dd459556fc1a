"""Chat messages -> token ids and a per-token loss mask, through a jinja2 chat template.

The template is the config's `chat_template`, else the tokenizer's own (tokenizer_config.json or
chat_template.jinja), else BUILTIN_TEMPLATE. A Hugging Face template renders exactly as transformers'
`apply_chat_template` renders it, and the ids are transformers' `apply_chat_template(tokenize=True)` ids: the
whole rendered text is tokenized at once with special tokens matched in it, no BOS/EOS added (the template writes
them: Llama 3 and Gemma write BOS, Qwen none). The environment and variables follow transformers 5
(src/transformers/utils/chat_template_utils.py, `_cached_compile_jinja_template` and `render_jinja_template`;
`apply_chat_template` in tokenization_utils_base.py): an ImmutableSandboxedEnvironment with trim_blocks and
lstrip_blocks, the loopcontrols extension and a {% generation %} tag; `raise_exception`, `strftime_now`, and a
`tojson` filter that does not escape HTML and takes indent/separators/sort_keys; the variables `messages`,
`tools` and `documents` (None), `add_generation_prompt`, the tokenizer's named special tokens (bos_token,
eos_token, ...), then the caller's template arguments (enable_thinking, date_string, ...). Messages lose keys
whose value is None, and a "thinking"/"reasoning" field is also passed as "reasoning_content", as transformers does.

Loss mask (completion_only_loss): a token counts when it overlaps an assistant turn's text, which is everything
the template writes for that turn after the generation prompt: the content, the end-of-turn token, and what the
template writes up to the next message (Llama 3: "content<|eot_id|>"; Qwen: "content<|im_end|>\\n"; Gemma:
"content<end_of_turn>\\n"; Qwen3's last turn also "<think>\\n...\\n</think>\\n\\n" before the content). This is
the span TRL's training templates wrap in {% generation %}. Templates with {% generation %} markers get exactly
those spans (as transformers' return_assistant_tokens_mask). Otherwise turn i starts where the generation prompt
for messages[:i] ends and ends where the rendering of messages[:i+1] ends. Templates that render an earlier turn
differently once later messages follow are handled when the earlier rendering is the last-turn rendering with
text dropped from its start (Qwen3, QwQ, DeepSeek-R1 drop earlier turns' reasoning: the turn is then located as
the longest stretch that is a suffix of its last-turn rendering, ending in the same end-of-turn text), and when
the generation prompt holds text that earlier turns lack (Qwen3 with enable_thinking=false: the turn starts where
the two part). Anything else is a UserError naming the message.
"""

from collections.abc import Sequence
import contextvars
import datetime
import json
import re

import jinja2
from jinja2 import ext, nodes, sandbox

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

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _raise_exception(message: str):
  raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
  # As transformers: jinja2's own tojson escapes HTML characters and takes no separators/sort_keys.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
  return datetime.datetime.now().strftime(format)


class _GenerationTag(ext.Extension):
  """{% generation %}...{% endgeneration %}: renders its body and, while `spans` is set, records its [start, end)."""

  tags = {"generation"}

  def __init__(self, environment: jinja2.Environment):
    super().__init__(environment)
    self.spans: contextvars.ContextVar = contextvars.ContextVar("generation_spans", default=None)

  def parse(self, parser) -> nodes.Node:
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

  def _body(self, caller) -> str:
    text = caller()
    tracking = self.spans.get()
    if tracking is not None:
      blocks, spans = tracking  # everything rendered before this block has been yielded into `blocks`
      start = sum(map(len, blocks))
      spans.append((start, start + len(text)))
    return text


def _environment() -> sandbox.ImmutableSandboxedEnvironment:
  # Sandboxed because templates come with downloaded checkpoints; options as Hugging Face renders them.
  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=[_GenerationTag, ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  return env


def _normalized(messages: Sequence[dict]) -> list[dict]:
  """Messages as transformers hands them to the template: keys with None values dropped, reasoning aliased."""
  out = []
  for message in messages:
    message = {key: value for key, value in dict(message).items() if value is not None}
    reasoning = next((message[key] for key in _REASONING_FIELDS if key in message), None)
    if reasoning is not None:
      message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    out.append(message)
  return out


def _common_prefix_length(a: str, b: str) -> int:
  n = min(len(a), len(b))
  lo, hi = 0, n  # binary search on slice equality: C-speed comparisons
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if a[:mid] == b[:mid]:
      lo = mid
    else:
      hi = mid - 1
  return lo


def _common_suffix_length(a: str, b: str) -> int:
  return _common_prefix_length(a[::-1], b[::-1])


def _longest_prefix_that_is_suffix(a: str, b: str) -> int:
  """The length of the longest prefix of `a` that is a suffix of `b` (Knuth-Morris-Pratt)."""
  if not a:
    return 0
  fail, k = [0] * len(a), 0
  for i in range(1, len(a)):
    while k and a[i] != a[k]:
      k = fail[k - 1]
    if a[i] == a[k]:
      k += 1
    fail[i] = k
  k = 0
  for char in b:
    while k and (k == len(a) or char != a[k]):
      k = fail[k - 1]
    if k < len(a) and char == a[k]:
      k += 1
  return k


class ChatTemplate:
  """A compiled chat template bound to a tokenizer: `template` if given, else the tokenizer's, else the built-in."""

  def __init__(self, template: str, tokenizer: Tokenizer):
    self._tokenizer = tokenizer
    own = getattr(tokenizer, "chat_template", None)
    if template:
      self.source, text = "config", template
    elif own:
      self.source, text = "tokenizer", own
    else:
      self.source, text = "builtin", BUILTIN_TEMPLATE
    self.template = text
    self._env = _environment()
    try:
      self._template = self._env.from_string(text)
    except jinja2.TemplateError as e:
      where = "the tokenizer's chat template" if self.source == "tokenizer" else "chat_template"
      raise UserError(f"{where}: not a valid jinja2 template ({e}); expected a Hugging Face style chat template, "
                      "or \"\" for the tokenizer's own (else the built-in one)") from e
    self._generation_tag = next(e for e in self._env.extensions.values() if isinstance(e, _GenerationTag))
    self._has_generation_tags = re.search(r"\{%-?\s*generation\s*-?%\}", text) is not None
    self._variables = dict(getattr(tokenizer, "special_tokens_map", None) or {})
    if not self._variables:  # a tokenizer without the map: its BOS/EOS
      self._variables = {k: v for k, v in (("bos_token", tokenizer.bos_token), ("eos_token", tokenizer.eos_token)) if v}

  @property
  def is_builtin(self) -> bool:
    """True for BUILTIN_TEMPLATE, whose examples get BOS/EOS from add_bos/add_eos; other templates write their own."""
    return self.source == "builtin"

  def render(self, messages: Sequence[dict], add_generation_prompt: bool = False, **template_kwargs) -> str:
    """The template's text for `messages`, as transformers' apply_chat_template(tokenize=False)."""
    return self._render(messages, add_generation_prompt, template_kwargs)[0]

  def _render(self, messages: Sequence[dict], add_generation_prompt: bool, template_kwargs: dict,
              track: bool = False) -> tuple[str, list[tuple[int, int]]]:
    variables = {"messages": _normalized(messages), "tools": None, "documents": None,
                 "add_generation_prompt": add_generation_prompt, **self._variables, **template_kwargs}
    blocks, spans = [], []
    token = self._generation_tag.spans.set((blocks, spans)) if track else None
    try:
      for block in self._template.generate(**variables):
        blocks.append(block)
    except jinja2.TemplateError as e:
      raise UserError(f"chat_template: rendering {len(messages)} messages failed: {e}") from e
    finally:
      if token is not None:
        self._generation_tag.spans.reset(token)
    return "".join(blocks), spans

  def assistant_spans(self, messages: Sequence[dict], **template_kwargs) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans of its assistant turns (see the module doc)."""
    if self._has_generation_tags:
      return self._render(messages, False, template_kwargs, track=True)
    text = self.render(messages, **template_kwargs)
    spans = []
    for i, message in enumerate(messages):
      if message.get("role") != "assistant":
        continue
      start = self._turn_start(messages, i, text, template_kwargs)
      end = self._turn_end(messages, i, start, text, template_kwargs)
      if spans and start < spans[-1][1]:
        raise self._unmaskable(i, "its turn overlaps the previous assistant turn")
      spans.append((start, end))
    return text, spans

  @staticmethod
  def _unmaskable(i: int, why: str) -> UserError:
    return UserError(
      f"chat_template: rendering a longer conversation changed the text of a shorter one, so the assistant turn of "
      f"message {i} cannot be located for completion_only_loss ({why}); use a template whose rendering of earlier "
      "messages does not depend on later ones, or set completion_only_loss=false")

  def _turn_start(self, messages, i: int, text: str, kwargs: dict) -> int:
    prompt = self.render(messages[:i], add_generation_prompt=True, **kwargs)
    if text.startswith(prompt):
      return len(prompt)
    before = self.render(messages[:i], **kwargs)
    start = _common_prefix_length(text, prompt)
    if text.startswith(before) and start >= len(before):
      # The generation prompt holds text this turn lacks (Qwen3's empty think block with enable_thinking=false).
      return start
    raise self._unmaskable(i, "the text before it changed")

  def _turn_end(self, messages, i: int, start: int, text: str, kwargs: dict) -> int:
    after = self.render(messages[:i + 1], **kwargs)
    if text.startswith(after) and len(after) >= start:
      return len(after)
    # Rendered differently once later messages follow: expected to be its last-turn rendering with text dropped
    # from the start (Qwen3 drops earlier turns' reasoning), ending in the same end-of-turn text.
    content = messages[i].get("content")
    if not after.startswith(text[:start]) or not isinstance(content, str):
      raise self._unmaskable(i, "the text of the turn changed")
    last_turn = after[start:]
    # The end-of-turn text: what follows the content, found as the common tail of two renderings whose contents
    # end differently.
    endings = [self.render([*messages[:i], {**messages[i], "content": content + mark}], **kwargs) for mark in "YZ"]
    closing = _common_suffix_length(*endings)
    k = _longest_prefix_that_is_suffix(text[start:start + len(last_turn)], last_turn)
    if closing == 0 or k < closing:
      raise self._unmaskable(i, "the turn is not its last-turn rendering with text dropped from its start")
    return start + k

  def tokenize(self, messages: Sequence[dict], completion_only_loss: bool,
               **template_kwargs) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation (transformers' apply_chat_template ids for a Hugging Face template) and a
    0/1 mask: 1 on tokens overlapping assistant turns (on all if not completion_only_loss). No messages: ([], [])."""
    if not messages:
      return [], []
    if not completion_only_loss:
      ids = self._tokenizer.encode(self.render(messages, **template_kwargs))
      return ids, [1] * len(ids)
    text, spans = self.assistant_spans(messages, **template_kwargs)
    ids, offsets = self._tokenizer.encode_with_offsets(text)
    mask, s = [], 0
    for start, end in offsets:  # offsets and spans are both in order: one pass
      while s < len(spans) and spans[s][1] <= start:
        s += 1
      inside = s < len(spans) and (max(start, spans[s][0]) < min(end, spans[s][1])
                                   or (start == end and spans[s][0] <= start < spans[s][1]))
      mask.append(int(inside))
    return ids, mask

  def prompt_ids(self, messages: Sequence[dict], **template_kwargs) -> list[int]:
    """Token ids of the conversation followed by the generation prompt, as transformers'
    apply_chat_template(add_generation_prompt=True); the sampler continues from them."""
    return self._tokenizer.encode(self.render(messages, add_generation_prompt=True, **template_kwargs))
