"""Records what Hugging Face transformers renders and tokenizes for each family's chat template.

    /tmp/hfenv/bin/python end_to_end/hf_parity/make_chat_goldens.py   # any Python with transformers >= 5

Run `make_tokenizers.py` first (it writes tokenizers/<family>/). For each family this loads the directory with
`AutoTokenizer.from_pretrained` and writes goldens/chat_<family>.json: per case the messages, flags and template
arguments, and `apply_chat_template(..., tokenize=False)` (text) and `(..., tokenize=True)` (ids) — or the
error message for conversations the template rejects. It also records the tokenizer's special tokens and
plain-text encodings, and goldens/chat_generation_tags.json holds `return_assistant_tokens_mask` for a template
with {% generation %} markers. tests/test_chat_templates.py checks tunix_core against these files without
importing transformers.
"""

import json
import pathlib

import tokenizers
import transformers

HERE = pathlib.Path(__file__).resolve().parent
FAMILIES = ("llama3", "qwen2", "qwen3", "gemma", "gemma3")

SYSTEM = {"role": "system", "content": "You are a helpful assistant. Be brief."}
U1 = {"role": "user", "content": "Anna has 3 apples. She gets 4 more. How many apples does Anna have?"}
A1 = {"role": "assistant", "content": "3 + 4 = 7. The answer is 7."}
U2 = {"role": "user", "content": "And if she gives 2 to Ben?"}
A2 = {"role": "assistant", "content": "7 - 2 = 5. The answer is 5."}
# Leading/trailing whitespace and inner newlines: Llama and Gemma trim contents, Qwen keeps them.
U1_SPACES = {"role": "user", "content": "  Write a short poem about the sea.\n"}
A1_SPACES = {"role": "assistant", "content": "\nThe sea is wide,\nthe sea is deep. "}
# Qwen3 reasoning: the template keeps the <think> block only for turns after the last user message.
A1_THINK = {"role": "assistant", "content": "<think>\nAdd 3 and 4.\n</think>\n\n3 + 4 = 7. The answer is 7."}
A2_THINK = {"role": "assistant", "content": "<think>\nSubtract 2 from 7.\n</think>\n\n7 - 2 = 5. The answer is 5."}
A2_REASONING = {"role": "assistant", "content": "7 - 2 = 5. The answer is 5.", "reasoning_content": "Subtract 2."}


def cases(family: str) -> list[dict]:
  """(name, messages, add_generation_prompt, template kwargs) for a family."""
  # Llama 3.2's template writes today's date (strftime_now) unless date_string is given: fix it for goldens.
  kwargs = {"date_string": "26 Jul 2024"} if family == "llama3" else {}
  out = []

  def case(name, messages, add_generation_prompt=False, **extra):
    out.append({"name": name, "messages": messages, "add_generation_prompt": add_generation_prompt,
                "template_kwargs": {**kwargs, **extra}})

  # Gemma (1 and 2) raises on a system message; every other family renders it.
  case("system_user_assistant", [SYSTEM, U1, A1])
  case("multi_turn", [U1, A1, U2, A2])
  case("multi_turn_system", [SYSTEM, U1, A1, U2, A2])
  case("multi_turn_whitespace", [U1_SPACES, A1_SPACES, U2, A2])
  case("generation_prompt", [U1], add_generation_prompt=True)
  case("generation_prompt_multi_turn", [U1, A1, U2], add_generation_prompt=True)
  case("roles_not_alternating", [U1, U2, A2])
  if family == "qwen3":
    case("thinking_multi_turn", [U1, A1_THINK, U2, A2_THINK])
    case("reasoning_content_field", [U1, A1, U2, A2_REASONING])
    case("generation_prompt_no_thinking", [U1], add_generation_prompt=True, enable_thinking=False)
    case("multi_turn_no_thinking", [U1, A1, U2, A2], enable_thinking=False)
    case("generation_prompt_multi_turn_no_thinking", [U1, A1, U2], add_generation_prompt=True, enable_thinking=False)
  return out


PLAIN_TEXTS = ["Anna has 3 apples. She gets 4 more.", "  two  spaces\n\nand newlines\n", "Zoë paid 5 € for a café.",
               "<think>not special</think> text <|im_end|> <eos> <|eot_id|>", "数字 123456"]


def family_goldens(family: str) -> dict:
  directory = HERE / "tokenizers" / family
  tok = transformers.AutoTokenizer.from_pretrained(str(directory))
  raw = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
  plain = []
  for text in PLAIN_TEXTS:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # The project reads tokenizer.json with the tokenizers library; transformers may rebuild the pipeline from
    # its tokenizer class (Qwen2Tokenizer, GemmaTokenizer): the two must agree for the goldens to mean anything.
    assert ids == raw.encode(text, add_special_tokens=False).ids, (family, text)
    plain.append({"text": text, "ids": ids})
  records = []
  for c in cases(family):
    record = dict(c)
    try:
      record["text"] = tok.apply_chat_template(c["messages"], tokenize=False,
                                               add_generation_prompt=c["add_generation_prompt"], **c["template_kwargs"])
      ids = tok.apply_chat_template(c["messages"], tokenize=True, return_dict=False,
                                    add_generation_prompt=c["add_generation_prompt"], **c["template_kwargs"])
      record["ids"] = list(ids)
      assert record["ids"] == raw.encode(record["text"], add_special_tokens=False).ids, (family, c["name"])
    except Exception as e:  # the template's raise_exception (jinja2 TemplateError)
      record["error"] = str(e)
    records.append(record)
  return {
    "family": family,
    "made_by": f"end_to_end/hf_parity/make_chat_goldens.py, transformers {transformers.__version__}, "
               f"tokenizers {tokenizers.__version__}",
    "tokenizer_class": type(tok).__name__,
    "special_tokens": {key: {"token": value, "id": tok.convert_tokens_to_ids(value)}
                       for key, value in tok.special_tokens_map.items()},
    "bos_token": tok.bos_token, "eos_token": tok.eos_token,
    "plain_texts": plain,
    "cases": records,
  }


# A ChatML template with {% generation %} markers around what the assistant writes (content, <|im_end|> and the
# newline), as in huggingface/trl's trl/chat_templates/*_training.jinja.
GENERATION_TEMPLATE = r"""{%- for message in messages %}
    {%- if message.role == 'assistant' %}
        {{- '<|im_start|>assistant\n' }}
        {%- generation %}
            {{- message.content + '<|im_end|>\n' }}
        {%- endgeneration %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}"""


def generation_tag_goldens() -> dict:
  tok = transformers.AutoTokenizer.from_pretrained(str(HERE / "tokenizers" / "qwen2"))
  records = []
  for name, messages in (("system_user_assistant", [SYSTEM, U1, A1]), ("multi_turn", [U1, A1, U2, A2])):
    out = tok.apply_chat_template(messages, chat_template=GENERATION_TEMPLATE, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    text = tok.apply_chat_template(messages, chat_template=GENERATION_TEMPLATE, tokenize=False)
    records.append({"name": name, "messages": messages, "text": text, "ids": list(out["input_ids"]),
                    "assistant_masks": list(out["assistant_masks"])})
  return {"family": "qwen2", "made_by": f"end_to_end/hf_parity/make_chat_goldens.py, transformers "
          f"{transformers.__version__}", "chat_template": GENERATION_TEMPLATE, "cases": records}


def write(name: str, data: dict):
  path = HERE / "goldens" / name
  path.parent.mkdir(exist_ok=True)
  path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
  print(path)


def main():
  for family in FAMILIES:
    write(f"chat_{family}.json", family_goldens(family))
  write("chat_generation_tags.json", generation_tag_goldens())


if __name__ == "__main__":
  main()
