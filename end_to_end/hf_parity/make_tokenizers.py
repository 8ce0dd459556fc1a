"""Writes tiny Hugging Face tokenizer directories, one per model family, with each family's real chat template.

    .venv/bin/python end_to_end/hf_parity/make_tokenizers.py

For each family in FAMILIES it writes `tokenizers/<family>/tokenizer.json` and `tokenizer_config.json` beside
this file: a BPE trained deterministically on TEXT (at most 512 tokens including the family's real special
tokens), laid out like the family's real tokenizer.json (pre-tokenizer regex, normalizer, decoder,
post-processor), and a tokenizer_config.json with the family's bos/eos/pad tokens, added tokens and chat
template as the real checkpoints set them. `make_chat_goldens.py` (run with transformers) then records what
transformers renders and tokenizes with these directories. Running this again writes identical bytes.

Llama 3 and Qwen use byte-level BPE, as the real ones do. Gemma's real tokenizer is a SentencePiece-style BPE
with byte fallback (spaces normalised to "▁", <0xNN> byte tokens); the tiny one is built the same way, because
transformers 5 rebuilds a `GemmaTokenizer` with that pipeline around the vocabulary of tokenizer.json.
"""

import json
import pathlib

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

OUT = pathlib.Path(__file__).resolve().parent / "tokenizers"
MAX_VOCAB = 512

# Pre-tokenizer regexes of the real tokenizer.json files (also in transformers: convert_slow_tokenizer.py's
# TikTokenConverter default pattern for Llama 3, models/qwen2/tokenization_qwen2.py's PRETOKENIZE_REGEX for Qwen).
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# ------------------------------------------------------------------------------------------- chat templates
# Each is the real template, character for character, from the source named above it.

# Llama 3.2 Instruct (meta-llama/Llama-3.2-3B-Instruct). Source: repository ye-NX/llama.cpp (a fork of
# ggml-org/llama.cpp, whose models/templates/ holds verbatim copies of Hub templates), path
# models/templates/meta-llama-Llama-3.2-3B-Instruct.jinja, commit b354d7c9ecb76c97c07098617cdebbdfffa2583e.
# Llama 3.1 Instruct differs only in its tool handling and in not calling strftime_now for the date.
LLAMA3_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# Qwen2.5 Instruct (Qwen/Qwen2.5-*-Instruct tokenizer_config.json). No verbatim copy was found in the stored
# sources; this is the original as the stored training copy documents it: repository huggingface/trl, path
# trl/chat_templates/qwen2_5_training.jinja, commit 7f1ec8cf0d5400c37f108be7ac08ee0c76759861 ("the original with
# {% generation %} markers added"), with the markers removed and the original branch layout (assistant turns
# without tool calls in the first branch) restored; a Rust test that quotes the Hub file verbatim (found by the
# search tool, repository not named) matches it character for character.
QWEN2_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Qwen3 (Qwen/Qwen3-*, the current revision with `content is string` checks). Source: repository
# huggingface/trl, path trl/chat_templates/qwen3.jinja ("Original Qwen3 chat template"), commit
# a22ae88f74ef3cf45b15b5370336b5527584d92b. An older revision is in ye-NX/llama.cpp
# models/templates/Qwen-Qwen3-0.6B.jinja; both render plain string messages identically.
QWEN3_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

# Gemma and Gemma 2 (google/gemma-*-it, google/gemma-2-*-it ship the same template; it raises on a system
# message). Source: repository ye-NX/llama.cpp, path models/templates/google-gemma-2-2b-it.jinja, commit
# b354d7c9ecb76c97c07098617cdebbdfffa2583e (huggingface/trl's trl/chat_templates/README.md: "Used by both Gemma
# (v1) and Gemma2, which ship identical templates").
GEMMA_TEMPLATE = (
  r"""{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"""
  r"""{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"""
  r"""{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"""
  r"""{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"""
  r"""{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"""
  r"""{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}""")

# Gemma 3 (google/gemma-3-*-it: a system message is prefixed to the first user turn). Source: repository
# huggingface/transformers, path src/transformers/models/gemma3/convert_gemma3_weights.py (`_CHAT_TEMPLATE`, the
# template its converter writes into Gemma 3 checkpoints), commit 0d7e95d96b4e187c651e2b2406ed98ed40d74963.
GEMMA3_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# ------------------------------------------------------------------------------------------------- families
# added: (content, special) in id order; bos/eos/pad/unk as the real tokenizer_config.json sets them.
FAMILIES = {
  "llama3": {  # meta-llama/Llama-3.2-*-Instruct
    "style": "byte_level", "regex": LLAMA3_REGEX, "nfc": False, "ignore_merges": True, "specials_first": False,
    "added": [("<|begin_of_text|>", True), ("<|end_of_text|>", True), ("<|finetune_right_pad_id|>", True),
              ("<|start_header_id|>", True), ("<|end_header_id|>", True), ("<|eom_id|>", True), ("<|eot_id|>", True),
              ("<|python_tag|>", True)],
    "config": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True,
               "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072,
               "tokenizer_class": "PreTrainedTokenizerFast"},
    "template": LLAMA3_TEMPLATE,
  },
  "qwen2": {  # Qwen/Qwen2.5-*-Instruct
    "style": "byte_level", "regex": QWEN_REGEX, "nfc": True, "ignore_merges": False, "specials_first": False,
    "added": [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<tool_call>", False),
              ("</tool_call>", False)],
    "config": {"add_bos_token": False, "add_prefix_space": False, "bos_token": None,
               "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
               "model_max_length": 131072, "pad_token": "<|endoftext|>", "split_special_tokens": False,
               "tokenizer_class": "Qwen2Tokenizer", "unk_token": None},
    "template": QWEN2_TEMPLATE,
  },
  "qwen3": {  # Qwen/Qwen3-*
    "style": "byte_level", "regex": QWEN_REGEX, "nfc": True, "ignore_merges": False, "specials_first": False,
    "added": [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<tool_call>", False),
              ("</tool_call>", False), ("<tool_response>", False), ("</tool_response>", False), ("<think>", False),
              ("</think>", False)],
    "config": {"add_bos_token": False, "add_prefix_space": False, "bos_token": None,
               "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
               "model_max_length": 131072, "pad_token": "<|endoftext|>", "split_special_tokens": False,
               "tokenizer_class": "Qwen2Tokenizer", "unk_token": None},
    "template": QWEN3_TEMPLATE,
  },
  "gemma": {  # google/gemma-*-it and google/gemma-2-*-it
    "style": "byte_fallback", "specials_first": True,
    "added": [("<pad>", True), ("<eos>", True), ("<bos>", True), ("<unk>", True), ("<mask>", True),
              ("<start_of_turn>", True), ("<end_of_turn>", True)],
    "config": {"add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>",
               "clean_up_tokenization_spaces": False, "eos_token": "<eos>", "model_max_length": 8192,
               "pad_token": "<pad>", "sp_model_kwargs": {}, "spaces_between_special_tokens": False,
               "tokenizer_class": "GemmaTokenizer", "unk_token": "<unk>", "use_default_system_prompt": False},
    "template": GEMMA_TEMPLATE,
  },
  "gemma3": {  # google/gemma-3-*-it
    "style": "byte_fallback", "specials_first": True,
    "added": [("<pad>", True), ("<eos>", True), ("<bos>", True), ("<unk>", True), ("<mask>", False),
              ("<start_of_turn>", True), ("<end_of_turn>", True), ("<start_of_image>", True),
              ("<end_of_image>", True), ("<image_soft_token>", True)],
    "config": {"add_bos_token": True, "add_eos_token": False, "boi_token": "<start_of_image>",
               "bos_token": "<bos>", "clean_up_tokenization_spaces": False, "eoi_token": "<end_of_image>",
               "eos_token": "<eos>", "image_token": "<image_soft_token>",
               "model_max_length": 1000000000000000019884624838656,
               "pad_token": "<pad>", "sp_model_kwargs": None, "spaces_between_special_tokens": False,
               "tokenizer_class": "GemmaTokenizer", "unk_token": "<unk>", "use_default_system_prompt": False},
    "template": GEMMA3_TEMPLATE,
  },
}

# The training text: chat-like English with numbers, punctuation, newlines and a few non-ASCII characters.
TEXT = """\
You are a helpful assistant. Be brief and answer the question.
Anna has 3 apples. She gets 4 more. How many apples does Anna have?
3 + 4 = 7. The answer is 7.
And if she gives 2 to Ben? 7 - 2 = 5. The answer is 5.
Jack has 12 stamps and gives 4 to Ben. How many stamps does Jack have left?
12 - 4 = 8. The answer is 8.
Hello! How are you today? I am fine, thank you. What can I do for you?
Please think step by step, then give the final answer on its own line.
Let me think. First we add, then we subtract; the result is the answer.
The weather is nice: sunny, warm and dry. Tomorrow it will rain.
Write a short poem about the sea.
The sea is wide, the sea is deep; it sings the sailors all to sleep.
Translate "good morning" to French: bonjour. Zoë paid 5 € for a café.
What is 15 * 3? 15 * 3 = 45. The answer is 45.
Summarize: the model reads the question, writes its reasoning, and ends its turn.
Cutting Knowledge Date: December 2023
Today Date: 26 Jul 2024
"""


def _byte_level(spec: dict) -> tokenizers.Tokenizer:
  """A byte-level BPE laid out like Llama 3's / Qwen's tokenizer.json; added tokens get the last ids."""
  tok = tokenizers.Tokenizer(models.BPE(ignore_merges=spec["ignore_merges"]))
  if spec["nfc"]:
    tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
    pre_tokenizers.Split(Regex(spec["regex"]), behavior="isolated", invert=False),
    pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=not spec["nfc"], use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=MAX_VOCAB - len(spec["added"]), show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([TEXT], trainer=trainer)
  bos = spec["config"].get("bos_token")
  if spec["nfc"]:  # Qwen: ByteLevel post-processor, no BOS
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
  for content, special in spec["added"]:
    tok.add_special_tokens([AddedToken(content, special=True, normalized=False)]) if special else \
      tok.add_tokens([AddedToken(content, special=False, normalized=False)])
  if not spec["nfc"]:  # Llama 3: the post-processor writes BOS (apply_chat_template does not use it)
    bos_id = tok.token_to_id(bos)
    tok.post_processor = processors.Sequence([
      processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
      processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, bos_id)])])
  return tok


def _byte_fallback(spec: dict) -> tokenizers.Tokenizer:
  """A SentencePiece-style BPE laid out like Gemma's tokenizer.json: special tokens first, then the 256 <0xNN>
  byte tokens, then the learned pieces ("▁" marks a space)."""
  learner = tokenizers.Tokenizer(models.BPE())
  learner.normalizer = normalizers.Replace(" ", "▁")
  learner.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")  # pieces never span words
  num_fixed = len(spec["added"]) + 256
  learner.train_from_iterator([TEXT], trainer=trainers.BpeTrainer(vocab_size=MAX_VOCAB - num_fixed,
                                                                   show_progress=False))
  learned = json.loads(learner.to_str())["model"]
  vocab = {content: i for i, (content, _) in enumerate(spec["added"])}
  vocab.update({f"<0x{b:02X}>": len(spec["added"]) + b for b in range(256)})
  for piece, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]):
    vocab.setdefault(piece, len(vocab))
  merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True,
                                        byte_fallback=True))
  tok.normalizer = normalizers.Replace(" ", "▁")
  tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
  tok.add_special_tokens([AddedToken(content, special=special, normalized=False) for content, special in spec["added"]
                          if special])
  tok.add_tokens([AddedToken(content, special=False, normalized=False) for content, special in spec["added"]
                  if not special])
  bos = spec["config"]["bos_token"]
  tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                                     special_tokens=[(bos, vocab[bos])])
  return tok


def tokenizer_config(spec: dict, tok: tokenizers.Tokenizer) -> dict:
  """tokenizer_config.json as the family's checkpoints have it: added tokens, special tokens, chat template."""
  added = {}
  for content, special in spec["added"]:
    added[str(tok.token_to_id(content))] = {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                                            "single_word": False, "special": special}
  config = {"added_tokens_decoder": added, **spec["config"], "chat_template": spec["template"]}
  return dict(sorted(config.items()))


def main():
  for family, spec in FAMILIES.items():
    tok = _byte_level(spec) if spec["style"] == "byte_level" else _byte_fallback(spec)
    size = tok.get_vocab_size(with_added_tokens=True)
    assert size <= MAX_VOCAB, (family, size)
    for content, _ in spec["added"]:
      assert tok.encode(content, add_special_tokens=False).ids == [tok.token_to_id(content)], (family, content)
    directory = OUT / family
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(
      json.dumps(tokenizer_config(spec, tok), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{directory}: {size} tokens")


if __name__ == "__main__":
  main()
