"""Hugging Face chat templates per model family, checked against transformers' goldens (no transformers import).

end_to_end/hf_parity/make_tokenizers.py writes a tiny tokenizer directory per family (llama3, qwen2, qwen3, gemma,
gemma3) with the family's real special tokens and chat template; make_chat_goldens.py records what transformers'
apply_chat_template renders (text) and tokenizes (ids) for a set of conversations.

Loss-mask convention checked here: an assistant turn is everything the template writes for it after the
generation prompt — the content (as the template writes it: Llama and Gemma trim it, Qwen3 keeps the reasoning
block only in turns after the last user message), the end-of-turn token, and what the template writes after that
before the next message ("\\n" for Qwen and Gemma). Nothing of system or user turns, nor the generation prompt.
"""

import datetime
import json
import pathlib
import re
import shutil

import ml_collections
import pytest
import yaml

from tunix_core.data import chat, pipeline
from tunix_core.data.tokenizer import load_tokenizer
from tunix_core.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
PARITY = REPO / "end_to_end" / "hf_parity"
FAMILIES = ("llama3", "qwen2", "qwen3", "gemma", "gemma3")
GOLDENS = {family: json.loads((PARITY / "goldens" / f"chat_{family}.json").read_text()) for family in FAMILIES}
CASES = [pytest.param(family, case, id=f"{family}-{case['name']}") for family in FAMILIES
         for case in GOLDENS[family]["cases"]]
TRAINING_CASES = [param for param in CASES
                  if "error" not in param.values[1] and not param.values[1]["add_generation_prompt"]]
# What each family's template writes after an assistant turn's content, up to the next message.
TURN_END = {"llama3": "<|eot_id|>", "qwen2": "<|im_end|>\n", "qwen3": "<|im_end|>\n", "gemma": "<end_of_turn>\n",
            "gemma3": "<end_of_turn>\n"}


def tokenizer_dir(family: str) -> str:
  return str(PARITY / "tokenizers" / family)


_TOKENIZERS = {}


def tokenizer(family: str):
  if family not in _TOKENIZERS:
    _TOKENIZERS[family] = load_tokenizer(tokenizer_dir(family))
  return _TOKENIZERS[family]


def expected_turns(family: str, case: dict) -> list[str]:
  """The text of each assistant turn under the convention above, written out from the family's template rules."""
  messages = case["messages"]
  last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
  turns = []
  for i, message in enumerate(messages):
    if message["role"] != "assistant":
      continue
    content = message["content"]
    if family in ("llama3", "gemma", "gemma3"):
      content = content.strip()
    elif family == "qwen3":
      reasoning = message.get("reasoning_content", "")
      if "</think>" in content and not reasoning:
        reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
        content = content.split("</think>")[-1].lstrip("\n")
      if i > last_user and (i == len(messages) - 1 or reasoning):
        block = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n"
        # With enable_thinking=false the empty block is part of the generation prompt, not of the turn.
        if not (case["template_kwargs"].get("enable_thinking") is False and not reasoning):
          content = block + content.lstrip("\n")
    turns.append(content + TURN_END[family])
  return turns


def masked_texts(tok, text: str, ids: list[int], mask: list[int]) -> list[str]:
  """The text under each run of masked tokens, from the tokens' character offsets."""
  encoded, offsets = tok.encode_with_offsets(text)
  assert encoded == ids
  runs, start, end = [], None, None
  for (a, b), m in zip(offsets + [(len(text), len(text))], mask + [0]):
    if m:
      start, end = (a if start is None else start), b
    elif start is not None:
      runs.append(text[start:end])
      start = None
  return runs


# ------------------------------------------------------------------------------------- tokenizer directories

@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_directory_matches_transformers(family):
  golden, tok = GOLDENS[family], tokenizer(family)
  assert tok.vocab_size <= 512 and tok.chat_template
  specials = golden["special_tokens"]
  for name in ("bos", "eos"):
    token = specials.get(f"{name}_token")
    assert getattr(tok, f"{name}_token") == (token and token["token"])
    assert getattr(tok, f"{name}_id") == (token and token["id"])
  # Qwen has no BOS (bos_token: null); the chat template sees the same named tokens as in transformers.
  assert (tok.bos_id is None) == family.startswith("qwen")
  # (transformers' GemmaTokenizer adds a mask_token of its own; tokenizer_config.json names none.)
  expected = {key: value["token"] for key, value in specials.items()}
  assert tok.special_tokens_map.items() <= expected.items()
  assert set(expected) - set(tok.special_tokens_map) <= {"mask_token"}
  for plain in golden["plain_texts"]:
    assert tok.encode(plain["text"]) == plain["ids"], plain["text"]


# ------------------------------------------------------------------------------------ rendering and ids

@pytest.mark.parametrize("family,case", CASES)
def test_rendering_and_ids_equal_transformers(family, case):
  template = chat.ChatTemplate("", tokenizer(family))
  assert template.source == "tokenizer" and not template.is_builtin
  args = (case["messages"], case["add_generation_prompt"])
  if "error" in case:  # the template's raise_exception (Gemma: no system role, roles must alternate)
    with pytest.raises(UserError, match="chat_template: rendering .*" + re.escape(case["error"])):
      template.render(*args, **case["template_kwargs"])
    return
  assert template.render(*args, **case["template_kwargs"]) == case["text"]
  if case["add_generation_prompt"]:
    ids = template.prompt_ids(case["messages"], **case["template_kwargs"])
  else:
    ids, mask = template.tokenize(case["messages"], completion_only_loss=False, **case["template_kwargs"])
    assert all(mask)
  assert ids == case["ids"]
  bos = tokenizer(family).bos_id
  assert ids.count(bos) == (0 if bos is None else 1) and (bos is None or ids[0] == bos)  # no double BOS


@pytest.mark.parametrize("family,case", TRAINING_CASES)
def test_loss_mask_covers_exactly_the_assistant_turns(family, case):
  tok = tokenizer(family)
  template = chat.ChatTemplate("", tok)
  ids, mask = template.tokenize(case["messages"], completion_only_loss=True, **case["template_kwargs"])
  assert ids == case["ids"]
  turns = masked_texts(tok, case["text"], ids, mask)
  assert turns == expected_turns(family, case)
  others = [m["content"].strip() for m in case["messages"] if m["role"] != "assistant"]
  assert not any(other in turn for other in others for turn in turns)
  # The sampler's prompt for each assistant turn is what training put before it.
  assistant = [i for i, m in enumerate(case["messages"]) if m["role"] == "assistant"]
  no_thinking = case["template_kwargs"].get("enable_thinking") is False
  for i in assistant:
    if no_thinking and i != assistant[-1]:
      continue  # the prompt holds an empty think block that earlier turns of the conversation lack
    prompt = template.prompt_ids(case["messages"][:i], **case["template_kwargs"])
    assert ids[:len(prompt)] == prompt and mask[len(prompt) - 1] == 0 and mask[len(prompt)] == 1


def test_generation_tags_give_transformers_assistant_masks():
  golden = json.loads((PARITY / "goldens" / "chat_generation_tags.json").read_text())
  template = chat.ChatTemplate(golden["chat_template"], tokenizer(golden["family"]))
  assert template.source == "config"
  for case in golden["cases"]:
    assert template.tokenize(case["messages"], completion_only_loss=True) == (case["ids"], case["assistant_masks"])


def test_qwen3_turns_that_cannot_be_located_are_a_user_error():
  template = chat.ChatTemplate("", tokenizer("qwen3"))
  user = {"role": "user", "content": "hi"}
  # An earlier turn keeps 3 leading newlines, its last-turn rendering only 2 ("</think>\n\n" + lstrip): the earlier
  # rendering is not the later one with text dropped from its start.
  messages = [user, {"role": "assistant", "content": "\n\n\nA poem."}, user, {"role": "assistant", "content": "ok"}]
  with pytest.raises(UserError, match="assistant turn of message 1 cannot be located.*completion_only_loss=false"):
    template.tokenize(messages, completion_only_loss=True)
  ids, _ = template.tokenize(messages, completion_only_loss=False)
  assert ids == tokenizer("qwen3").encode(template.render(messages))


# ------------------------------------------------------------------------------------------- environment

def test_environment_helpers_behave_as_in_transformers():
  tok = tokenizer("llama3")
  # strftime_now: Llama 3.2 writes today's date unless date_string is given.
  before = datetime.datetime.now().strftime("%d %b %Y")
  text = chat.ChatTemplate("", tok).render([{"role": "user", "content": "hi"}])
  assert f"Today Date: {before}" in text or f"Today Date: {datetime.datetime.now().strftime('%d %b %Y')}" in text
  render = lambda source, **kw: chat.ChatTemplate(source, tok).render([{"role": "user", "content": "<b>&é"}], **kw)
  # tojson does not escape HTML nor non-ASCII, and takes indent/separators/sort_keys.
  assert render("{{ messages[0] | tojson }}") == '{"role": "user", "content": "<b>&é"}'
  assert render("{{ {'b': 1, 'a': [2]} | tojson(indent=2, sort_keys=true) }}") == \
      '{\n  "a": [\n    2\n  ],\n  "b": 1\n}'
  # Loop controls, trim_blocks/lstrip_blocks, the named special tokens and extra template arguments.
  assert render("{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}") == "01"
  assert render("  {% if true %}\nA\n  {% endif %}\nB") == "A\nB"
  assert render("{{ bos_token }}|{{ eos_token }}|{{ pad_token is defined }}|{{ x }}", x=3) == \
      "<|begin_of_text|>|<|eot_id|>|False|3"
  with pytest.raises(UserError, match="chat_template: rendering 1 messages failed: stop here"):
    render("{{ raise_exception('stop here') }}")
  with pytest.raises(UserError, match="unsafe"):  # the sandbox (immutable too: no list.append)
    render("{{ messages.append(1) }}")
  # Messages as transformers passes them: None values dropped, reasoning aliased to reasoning_content.
  template = chat.ChatTemplate("{{ messages[0] | tojson }}", tok)
  assert template.render([{"role": "assistant", "content": "a", "tool_calls": None, "thinking": "t"}]) == \
      '{"thinking": "t", "role": "assistant", "content": "a", "reasoning_content": "t"}'


def test_template_choice():
  sp = load_tokenizer(str(REPO / "assets" / "tokenizer.model"))
  assert chat.ChatTemplate("", sp).source == "builtin"  # no template of its own: the built-in one
  own = chat.ChatTemplate("{{ 'mine' }}", tokenizer("qwen2"))
  assert own.source == "config" and own.render([]) == "mine"
  broken = load_tokenizer(tokenizer_dir("qwen2"))
  broken.chat_template = "{% for %}"
  with pytest.raises(UserError, match="the tokenizer's chat template: not a valid jinja2 template"):
    chat.ChatTemplate("", broken)


# ------------------------------------------------------------------------------------------ loading files

def test_chat_template_files(tmp_path):
  source = pathlib.Path(tokenizer_dir("qwen2"))
  shutil.copy(source / "tokenizer.json", tmp_path / "tokenizer.json")
  config = json.loads((source / "tokenizer_config.json").read_text())
  # A tokenizer.json path reads the files beside it.
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  assert load_tokenizer(str(tmp_path / "tokenizer.json")).chat_template == config["chat_template"]
  # chat_template.jinja wins over tokenizer_config.json (transformers 5 saves templates there).
  (tmp_path / "chat_template.jinja").write_text("{{ 'from jinja file' }}")
  assert load_tokenizer(str(tmp_path)).chat_template == "{{ 'from jinja file' }}"
  (tmp_path / "chat_template.jinja").unlink()
  # Named templates: the default one.
  config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  assert load_tokenizer(str(tmp_path)).chat_template == "D"
  config["chat_template"] = [{"name": "tool_use", "template": "T"}]
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  with pytest.raises(UserError, match="no 'default' one"):
    load_tokenizer(str(tmp_path))
  # special_tokens_map.json fills in what tokenizer_config.json does not name.
  del config["chat_template"], config["eos_token"]
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|endoftext|>"}}))
  tok = load_tokenizer(str(tmp_path))
  assert tok.chat_template is None and tok.eos_token == "<|endoftext|>" and tok.bos_token is None


def test_sentencepiece_directory(tmp_path):
  shutil.copy(REPO / "assets" / "tokenizer.model", tmp_path / "tokenizer.model")
  template = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>{% endfor %}"
              "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "<|end|>"}))
  tok = load_tokenizer(str(tmp_path))
  assert tok.chat_template == template and tok.eos_token == "<|end|>" and tok.eos_id == tok.encode("<|end|>")[0]
  assert tok.bos_token == "<s>" and tok.special_tokens_map == {"bos_token": "<s>", "eos_token": "<|end|>"}
  # The template writes BOS as text; a control token written as text becomes its id.
  messages = [{"role": "user", "content": "Zoë?"}, {"role": "assistant", "content": "5 €!"}]
  ids, mask = chat.ChatTemplate("", tok).tokenize(messages, completion_only_loss=True)
  assert ids == [tok.bos_id] + tok.encode("<|user|>\nZoë?<|end|><|assistant|>\n5 €!<|end|>")
  assert masked_texts(tok, chat.ChatTemplate("", tok).render(messages), ids, mask) == ["5 €!<|end|>"]


# ------------------------------------------------------------------------------------------------ pipeline

BASE = yaml.safe_load((REPO / "configs" / "base.yml").read_text())


def make_config(tmp_path, family: str, records: list, **overrides) -> ml_collections.FrozenConfigDict:
  path = tmp_path / "data.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  values = {**BASE, "dataset_type": "jsonl", "dataset_path": str(path), "eval_dataset_path": "",
            "tokenizer_path": tokenizer_dir(family), "chat_template": "", "add_bos": True, "add_eos": True,
            "completion_only_loss": True, "max_target_length": 256, "long_examples": "truncate", "packing": False,
            "data_shuffle": False, "seed": 0, "process_index": 0, "num_processes": 1, "process_batch_size": 2,
            "eval_batch_size": 2}
  return ml_collections.FrozenConfigDict({**values, **overrides})


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama3"])  # Llama 3.2's goldens fix the date
def test_pipeline_examples_are_transformers_ids(tmp_path, family):
  cases = {case["name"]: case for case in GOLDENS[family]["cases"]}
  case, prompt_case = cases["multi_turn"], cases["generation_prompt_multi_turn"]
  tok = tokenizer(family)
  # add_bos/add_eos are true: the template writes BOS itself (Llama 3, Gemma) or has none (Qwen), and ends its turns.
  config = make_config(tmp_path, family, [{"messages": case["messages"]}] * 2)
  batch = next(pipeline.make_train_iterator(config, tok))
  row = batch["segment_ids"][0] == 1
  assert batch["inputs"][0][row].tolist() == case["ids"][:-1] and batch["targets"][0][row].tolist() == case["ids"][1:]
  turns = masked_texts(tok, case["text"], case["ids"], [0] + batch["loss_mask"][0][row].astype(int).tolist())
  assert turns == expected_turns(family, case)
  assert pipeline.prompt_ids(config, tok, prompt_case["messages"]) == prompt_case["ids"]


def test_pipeline_llama3_dates_its_system_header_today(tmp_path):
  case = next(c for c in GOLDENS["llama3"]["cases"] if c["name"] == "multi_turn")
  tok = tokenizer("llama3")
  config = make_config(tmp_path, "llama3", [{"messages": case["messages"]}] * 2)
  batch = next(pipeline.make_train_iterator(config, tok))
  row = batch["segment_ids"][0] == 1
  today = datetime.datetime.now().strftime("%d %b %Y")
  ids = batch["inputs"][0][row].tolist() + batch["targets"][0][row].tolist()[-1:]
  assert ids == tok.encode(case["text"].replace("26 Jul 2024", today))


def test_no_bos_tokenizer_with_add_bos(tmp_path):
  # Qwen has no BOS: chat messages need none, a prompt/completion record does and says so.
  config = make_config(tmp_path, "qwen2", [{"prompt": "Hi", "completion": "Hello"}] * 2)
  iterator = pipeline.make_train_iterator(config, tokenizer("qwen2"))
  with pytest.raises(UserError, match="add_bos=true but tokenizer_path=.*qwen2 has no BOS token; set add_bos=false"):
    next(iterator)
  config = make_config(tmp_path, "qwen2", [{"prompt": "Hi", "completion": "Hello"}] * 2, add_bos=False)
  batch = next(pipeline.make_train_iterator(config, tokenizer("qwen2")))
  assert batch["targets"][0][batch["segment_ids"][0] == 1][-1] == tokenizer("qwen2").eos_id
