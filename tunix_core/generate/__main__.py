"""Generate from a model: `python3 -m tunix_core.generate configs/base.yml [load_parameters_path=... | hf_path=...]
prompt="..." max_new_tokens=N temperature=T seed=S`.

stdout carries only the completions:
  prompt=...        each completion's text followed by a newline (num_samples of them, in order); chat=true
                    sends the prompt as one user message through the chat template
  prompts_file=...  JSONL, one object per completion: {"prompt_index", "sample_index", "text", "token_ids",
                    "logprobs", "raw_logprobs", "finish_reason", "length"}; each input line holds prompt_field
                    text or messages_field chat messages (rendered with the chat template)
Everything else goes to stderr. A mistake (config, prompts file) is one line on stderr and exit status 2.
The same seed gives the same completions.
"""

from collections.abc import Sequence
import json
import os
import sys

from tunix_core import config as config_lib
from tunix_core.errors import UserError


def log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def read_prompts(config) -> list:
  """The prompts to complete: strings, or lists of chat messages."""
  if config.prompt:
    return [[{"role": "user", "content": config.prompt}] if config.chat else config.prompt]
  if not config.prompts_file:
    raise UserError("nothing to generate from: give prompt=\"...\" or prompts_file=PATH.jsonl")
  if not os.path.isfile(config.prompts_file):
    raise UserError(f"prompts_file={config.prompts_file}: no such file")
  prompts = []
  with open(config.prompts_file) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f"prompts_file={config.prompts_file} line {number}: not valid JSON ({e.msg})") from None
      value = record.get(config.messages_field, record.get(config.prompt_field)) if isinstance(record, dict) else None
      if not isinstance(value, (str, list)) or not value:
        raise UserError(f"prompts_file={config.prompts_file} line {number}: expected an object with a "
                        f"{config.prompt_field!r} string or {config.messages_field!r} chat messages")
      prompts.append(value)
  if not prompts:
    raise UserError(f"prompts_file={config.prompts_file}: no prompts in it")
  return prompts


def generate(argv: Sequence[str]) -> None:
  """Loads the config and the weights, generates, prints the completions to stdout."""
  config = config_lib.load(argv)
  prompts = read_prompts(config)
  # Heavy imports after the config is known to be valid, so a mistake is reported at once.
  from tunix_core import train  # pylint: disable=import-outside-toplevel
  from tunix_core.data import pipeline, tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  from tunix_core.generate import sampler  # pylint: disable=import-outside-toplevel
  from tunix_core.generate.sampling import SamplingParams  # pylint: disable=import-outside-toplevel

  tokenizer = tokenizer_lib.load_tokenizer(config.tokenizer_path)
  prompt_ids = [pipeline.prompt_ids(config, tokenizer, p) for p in prompts]
  stop = tuple(tuple(tokenizer.encode(s)) for s in config.stop_sequences)
  sampling = SamplingParams(
      max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
      min_p=config.min_p, num_samples=config.num_samples, beam_width=config.beam_width,
      length_penalty=config.length_penalty, eos_ids=sampler.eos_ids(config, tokenizer), stop_sequences=stop)
  setup = train.build(config)
  with setup.activate():
    log(f"weights: {train.starting_point(config)}" + ("" if config.load_parameters_path or config.hf_path
                                                        else " (random: set load_parameters_path or hf_path)"))
    weights = setup.starting_params(config)
    generator = sampler.Sampler(setup.graphdef, weights, tokenizer, batch_size=config.generate_batch_size,
                                prefill_buckets=config.prefill_length_buckets,
                                decode_halvings=config.decode_halvings, threads=config.generate_threads)
    log(f"generating for {len(prompts)} prompt(s), {config.num_samples} completion(s) each")
    results = generator.generate(prompt_ids, sampling, seed=config.seed)
  if config.process_index != 0:
    return
  for group in results:
    for c in group:
      if config.prompts_file:
        sys.stdout.write(json.dumps({
            "prompt_index": c.prompt_index, "sample_index": c.sample_index, "text": c.text, "token_ids": c.token_ids,
            "logprobs": c.logprobs, "raw_logprobs": c.raw_logprobs, "finish_reason": c.finish_reason,
            "length": c.length}) + "\n")
      else:
        sys.stdout.write(c.text + "\n")
  sys.stdout.flush()


def main(argv: Sequence[str]) -> int:
  try:
    generate(argv)
  except UserError as e:
    print(f"tunix_core.generate: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
