"""Data layer: tokenizers, sources, chat masking, the training iterator (packing, counters, state, processes), eval."""

import json
import pathlib
import random
import re
import shutil
import subprocess
import sys

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tunix_core.data import arithmetic, chat, pipeline, sources
from tunix_core.data.tokenizer import load_tokenizer
from tunix_core.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
SP_MODEL = str(REPO / "assets" / "tokenizer.model")
HF_JSON = str(REPO / "tests" / "fixtures" / "tokenizer.json")
TRAIN = str(REPO / "assets" / "arithmetic" / "train.jsonl")
EVAL = str(REPO / "assets" / "arithmetic" / "eval.jsonl")
BASE = yaml.safe_load((REPO / "configs" / "base.yml").read_text())
TEXTS = ["Anna has 3 apples. She gets 12 more.\n3 + 12 = 15. The answer is 15.", "<|user|>\nhi<|end|>",
         "Zoë paid 5 €!"]


def make_config(**overrides) -> ml_collections.FrozenConfigDict:
  """base.yml with the data keys these tests rely on pinned (defaults may change), plus the derived keys."""
  assert set(overrides) <= set(BASE) | {"process_index", "num_processes", "process_batch_size", "eval_batch_size"}
  values = {**BASE, "dataset_type": "jsonl", "tokenizer_path": SP_MODEL, "dataset_path": TRAIN,
            "eval_dataset_path": EVAL, "chat_template": "", "add_bos": True, "add_eos": True,
            "completion_only_loss": True, "max_target_length": 128, "long_examples": "truncate", "packing": True,
            "data_shuffle": True, "seed": 0, "eval_steps": 4,
            "process_index": 0, "num_processes": 1, "process_batch_size": 4, "eval_batch_size": 4}
  return ml_collections.FrozenConfigDict({**values, **overrides})


def write_jsonl(path: pathlib.Path, records: list) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


@pytest.fixture(scope="module")
def sp():
  return load_tokenizer(SP_MODEL)


def take(iterator, n: int) -> list[dict]:
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a: list[dict], b: list[dict]):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# ---------------------------------------------------------------------------------------------- tokenizers

@pytest.mark.parametrize("path,ids", [(SP_MODEL, (2, 3, 0)), (HF_JSON, (1, 2, 0))])
def test_tokenizer_round_trip(path, ids):
  tok = load_tokenizer(path)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == ids
  assert tok.vocab_size <= 512
  for text in TEXTS:
    encoded = tok.encode(text)
    assert tok.bos_id not in encoded and tok.eos_id not in encoded
    assert tok.decode(encoded) == text
    assert tok.decode([tok.bos_id] + encoded + [tok.eos_id, tok.pad_id]) == text
  for marker in chat.MARKERS:
    assert len(tok.encode(marker)) == 1


def test_tokenizer_config_beside_tokenizer_json_wins(tmp_path):
  shutil.copy(HF_JSON, tmp_path / "tokenizer.json")
  (tmp_path / "tokenizer_config.json").write_text(
    json.dumps({"bos_token": None, "eos_token": {"content": "<|end|>"}, "pad_token": "</s>"}))
  tok = load_tokenizer(str(tmp_path))  # a directory holding tokenizer.json works too
  assert tok.bos_id is None and tok.bos_token is None
  assert tok.eos_token == "<|end|>" and tok.eos_id == tok.encode("<|end|>")[0]
  assert tok.pad_id == 2


def test_tokenizer_errors(tmp_path):
  with pytest.raises(UserError, match=r"tokenizer_path=nope\.model: no such file.*SentencePiece"):
    load_tokenizer("nope.model")
  (tmp_path / "bad.model").write_bytes(b"not a model")
  with pytest.raises(UserError, match="bad.model"):
    load_tokenizer(str(tmp_path / "bad.model"))
  (tmp_path / "tokenizer.json").write_text("{")
  with pytest.raises(UserError, match="tokenizer.json"):
    load_tokenizer(str(tmp_path / "tokenizer.json"))


def test_add_bos_needs_a_bos_token(tmp_path):
  shutil.copy(HF_JSON, tmp_path / "tokenizer.json")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": None}))
  config = make_config(tokenizer_path=str(tmp_path / "tokenizer.json"))
  with pytest.raises(UserError, match="add_bos=true.*no BOS token"):
    pipeline.make_train_iterator(config, load_tokenizer(config.tokenizer_path))


# ------------------------------------------------------------------------------------------------- sources

FIELDS = sources.Fields("prompt", "completion", "messages")


def test_jsonl_source(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text('{"prompt": "a", "completion": "b"}\n\n{"messages": [{"role": "user", "content": "ü"}]}\n')
  source = sources.JsonlSource(str(path), FIELDS)
  assert len(source) == 2
  assert source[0] == {"prompt": "a", "completion": "b"}
  assert source[1]["messages"][0]["content"] == "ü"


def test_jsonl_errors_name_file_and_line(tmp_path):
  good = json.dumps({"prompt": "a", "completion": "b"})
  path = tmp_path / "bad.jsonl"
  path.write_text(f"{good}\n\n{{not json\n")
  with pytest.raises(UserError, match=r"dataset_path=.*bad\.jsonl, line 3: not valid JSON"):
    sources.JsonlSource(str(path), FIELDS)
  path.write_text(f'{good}\n{{"prompt": "only a prompt"}}\n')
  with pytest.raises(UserError, match=r"bad\.jsonl, line 2: .*neither 'messages' nor both 'prompt' and 'completion'"):
    sources.JsonlSource(str(path), FIELDS)
  with pytest.raises(UserError, match=r"eval_dataset_path=.*missing\.jsonl: no such file"):
    sources.JsonlSource(str(tmp_path / "missing.jsonl"), FIELDS, key="eval_dataset_path")


def test_empty_training_data_key_is_an_error(sp):
  with pytest.raises(UserError, match="dataset_path is empty"):
    pipeline.make_train_iterator(make_config(dataset_path=""), sp)
  with pytest.raises(UserError, match="train_split is empty"):
    pipeline.make_train_iterator(make_config(dataset_type="tfds", dataset_name="x", train_split=""), sp)


def test_parquet_source(tmp_path):
  path = tmp_path / "d.parquet"
  pq.write_table(pa.table({"prompt": ["p0", "p1", None], "completion": ["c0", "c1", "c2"]}), path)
  source = sources.ParquetSource(str(path), FIELDS)
  assert len(source) == 3
  assert source[1] == {"prompt": "p1", "completion": "c1"}
  with pytest.raises(UserError, match=r"d\.parquet, row 2"):
    source[2]
  with pytest.raises(UserError, match=r"dataset_path=.*nope\.parquet: no such file"):
    sources.ParquetSource(str(tmp_path / "nope.parquet"), FIELDS)


def test_parquet_training_batches(tmp_path, sp):
  rows = [json.loads(line) for line in open(TRAIN)][:40]
  path = tmp_path / "train.parquet"
  pq.write_table(pa.Table.from_pylist(rows), path)
  batch = next(pipeline.make_train_iterator(make_config(dataset_type="parquet", dataset_path=str(path)), sp))
  assert batch["inputs"].shape == (4, 128) and batch["segment_ids"].max() >= 2


def test_tfds_source(sp, tmp_path):
  import tensorflow_datasets as tfds

  class TunixTinyQa(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      features = tfds.features.FeaturesDict({"prompt": tfds.features.Text(), "completion": tfds.features.Text()})
      return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(8), "test": self._generate_examples(3)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"prompt": f"Question {i}?\n", "completion": f"The answer is {i}."}

  TunixTinyQa(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  config = make_config(dataset_type="tfds", dataset_name="tunix_tiny_qa", dataset_path=str(tmp_path),
                       train_split="train", eval_split="test", packing=False, eval_steps=-1, eval_batch_size=2)
  prompts = prompt_texts(sp, next(pipeline.make_train_iterator(config, sp)))
  assert all(p in {f"Question {i}?\n" for i in range(8)} for p in prompts)
  assert [len(b["inputs"]) for b in pipeline.make_eval_batches(config, sp)] == [2, 2]
  assert pipeline.make_eval_batches(make_config(dataset_type="tfds", dataset_name="tunix_tiny_qa"), sp) == []
  with pytest.raises(UserError, match="dataset_name=no_such_dataset, split=train"):
    pipeline.make_train_iterator(make_config(dataset_type="tfds", dataset_name="no_such_dataset"), sp)


def test_tfds_is_imported_only_when_used():
  code = "import sys, tunix_core.data.pipeline; assert 'tensorflow_datasets' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------------- chat

CONVERSATION = [
  {"role": "system", "content": "Be brief."},
  {"role": "user", "content": "Anna has 3 apples. She gets 4 more. How many?"},
  {"role": "assistant", "content": "3 + 4 = 7. The answer is 7."},
  {"role": "user", "content": "And 2 more?"},
  {"role": "assistant", "content": "7 + 2 = 9. The answer is 9."},
]
# A Hugging Face style template (block tags on their own lines, trim_blocks/lstrip_blocks), ending turns in EOS.
HF_STYLE_TEMPLATE = """{{ bos_token }}
{% for m in messages %}
### {{ m['role'] }}:
{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}

{% endfor %}
{% if add_generation_prompt %}
### assistant:
{% endif %}"""


def masked_spans(tok, ids, mask) -> list[str]:
  """The decoded runs of ids whose mask is 1."""
  spans, run = [], []
  for i, m in zip(list(ids) + [None], list(mask) + [0]):
    if m:
      run.append(i)
    elif run:
      spans.append(tok.decode(run))
      run = []
  return spans


def test_chat_builtin_template_masks_exactly_assistant_turns(sp):
  template = chat.ChatTemplate("", sp)
  ids, mask = template.tokenize(CONVERSATION, completion_only_loss=True)
  assert masked_spans(sp, ids, mask) == [m["content"] + "<|end|>" for m in CONVERSATION if m["role"] == "assistant"]
  assert sp.decode(ids) == ("<|system|>\nBe brief.<|end|>\n<|user|>\nAnna has 3 apples. She gets 4 more. How many?"
                            "<|end|>\n<|assistant|>\n3 + 4 = 7. The answer is 7.<|end|>\n<|user|>\nAnd 2 more?<|end|>\n"
                            "<|assistant|>\n7 + 2 = 9. The answer is 9.<|end|>")
  _, all_mask = template.tokenize(CONVERSATION, completion_only_loss=False)
  assert all(all_mask)
  # The sampler's prompt is exactly what training put before the last assistant turn.
  prompt = template.prompt_ids(CONVERSATION[:-1])
  assert ids[:len(prompt)] == prompt and mask[len(prompt) - 1] == 0 and mask[len(prompt)] == 1


def test_chat_hf_style_template_with_hf_tokenizer():
  tok = load_tokenizer(HF_JSON)
  template = chat.ChatTemplate(HF_STYLE_TEMPLATE, tok)
  ids, mask = template.tokenize(CONVERSATION, completion_only_loss=True)
  assert ids[0] == tok.bos_id and ids.count(tok.eos_id) == 2  # special tokens in the text become their ids
  # An assistant turn is all the template writes for it after the generation prompt: content, EOS, newline.
  assert masked_spans(tok, ids, mask) == [m["content"] + "\n" for m in CONVERSATION if m["role"] == "assistant"]
  assert all(m for i, m in zip(ids, mask) if i == tok.eos_id)
  assert tok.decode(template.prompt_ids(CONVERSATION[:2])).endswith("How many?\n### assistant:\n")
  # The template writes BOS itself; add_bos does not add a second one.
  config = make_config(tokenizer_path=HF_JSON, chat_template=HF_STYLE_TEMPLATE)
  assert pipeline.prompt_ids(config, tok, CONVERSATION[:2]) == template.prompt_ids(CONVERSATION[:2])
  assert pipeline.prompt_ids(config, tok, "Hi") == [tok.bos_id] + tok.encode("Hi")


def test_chat_template_errors(sp):
  with pytest.raises(UserError, match="chat_template: not a valid jinja2 template"):
    chat.ChatTemplate("{% for %}", sp)
  unstable = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
  with pytest.raises(UserError, match="chat_template: rendering a longer conversation changed"):
    chat.ChatTemplate(unstable, sp).tokenize(CONVERSATION, True)
  with pytest.raises(UserError, match="chat_template: rendering"):
    chat.ChatTemplate("{{ raise_exception('roles must alternate') }}", sp).tokenize(CONVERSATION, True)


def test_messages_examples_in_the_pipeline(tmp_path, sp):
  path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 4)
  batch = next(pipeline.make_train_iterator(make_config(dataset_path=path, packing=False, data_shuffle=False), sp))
  row = batch["segment_ids"][0] == 1
  spans = masked_spans(sp, batch["targets"][0][row], batch["loss_mask"][0][row])
  # EOS (hidden by decode) is a target of the last assistant turn.
  assert spans == ["3 + 4 = 7. The answer is 7.<|end|>", "7 + 2 = 9. The answer is 9.<|end|>"]
  assert batch["targets"][0][row][-1] == sp.eos_id and batch["loss_mask"][0][row][-1] == 1
  prompt = pipeline.prompt_ids(make_config(), sp, CONVERSATION[:2])
  assert prompt[0] == sp.bos_id and sp.decode(prompt).endswith("How many?<|end|>\n<|assistant|>\n")


# ------------------------------------------------------------------------------------------ training iterator

def prompt_texts(tok, batch: dict) -> list[str]:
  """Per row, the decoded targets outside the loss: the prompt of an unpacked row."""
  prompt = (batch["loss_mask"] == 0) & (batch["segment_ids"] > 0)
  return [tok.decode(batch["targets"][r][prompt[r]]) for r in range(len(prompt))]


def segments(batch: dict):
  """Yields (row, segment mask) for every example in a batch."""
  for r in range(batch["inputs"].shape[0]):
    for s in range(1, batch["segment_ids"][r].max() + 1):
      yield r, batch["segment_ids"][r] == s


def test_packed_batches_keep_examples_apart(sp):
  records = {r["prompt"]: r["completion"] for r in map(json.loads, open(TRAIN))}
  config = make_config(max_target_length=96)
  batches = take(pipeline.make_train_iterator(config, sp), 3)
  seen = 0
  for batch in batches:
    assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
      "inputs": (np.int32, (4, 96)), "targets": (np.int32, (4, 96)), "loss_mask": (np.float32, (4, 96)),
      "segment_ids": (np.int32, (4, 96)), "positions": (np.int32, (4, 96))}
    for r in range(4):
      segment_ids = batch["segment_ids"][r]
      n = np.count_nonzero(segment_ids)
      # Examples fill the row from the left, numbered 1, 2, ... in order; the rest is padding.
      assert np.all(segment_ids[:n] > 0) and np.all(np.diff(segment_ids[:n]) >= 0)
      assert segment_ids[0] == 1 and np.all(np.diff(segment_ids[:n]) <= 1)
      for key in ("inputs", "targets", "loss_mask", "positions"):
        assert not np.any(batch[key][r][n:])
    for r, seg in segments(batch):
      inputs, targets, mask = batch["inputs"][r][seg], batch["targets"][r][seg], batch["loss_mask"][r][seg]
      np.testing.assert_array_equal(batch["positions"][r][seg], np.arange(len(inputs)))
      # Targets are the inputs shifted by one inside the example: no target comes from the next example.
      np.testing.assert_array_equal(targets[:-1], inputs[1:])
      ids = list(inputs) + [targets[-1]]
      assert ids[0] == sp.bos_id and ids[-1] == sp.eos_id
      prompt_text = sp.decode(targets[mask == 0])
      assert records[prompt_text] == sp.decode(targets[mask == 1])
      assert list(ids[:np.count_nonzero(mask == 0) + 1]) == pipeline.prompt_ids(config, sp, prompt_text)
      seen += 1
  assert seen > 3 * 4  # packing put several examples in some rows


def test_unpacked_rows_hold_one_example(sp):
  first = json.loads(open(TRAIN).readline())
  batch = next(pipeline.make_train_iterator(make_config(packing=False, data_shuffle=False), sp))
  ids = sp.encode(first["prompt"]) + sp.encode(first["completion"])
  n = len(ids) + 1
  np.testing.assert_array_equal(batch["inputs"][0][:n], [sp.bos_id] + ids)
  np.testing.assert_array_equal(batch["targets"][0][:n], ids + [sp.eos_id])
  np.testing.assert_array_equal(batch["segment_ids"][0], [1] * n + [0] * (128 - n))
  np.testing.assert_array_equal(batch["positions"][0][:n], np.arange(n))
  np.testing.assert_array_equal(batch["loss_mask"][0][:n], [0] * len(sp.encode(first["prompt"])) +
                                [1] * (len(sp.encode(first["completion"])) + 1))
  assert not batch["positions"][0][n:].any()


def test_completion_only_loss_false_counts_every_target(sp):
  batch = next(pipeline.make_train_iterator(make_config(completion_only_loss=False), sp))
  np.testing.assert_array_equal(batch["loss_mask"], batch["segment_ids"] > 0)


LONG = {"prompt": "Tell me.\n", "completion": " ".join(["1 + 1 = 2."] * 8)}
SHORT = {"prompt": "Hi\n", "completion": "Yes."}


@pytest.fixture
def mixed_lengths(tmp_path):
  # short, long, short, short, long, short, long, short, short, long
  kinds = "slsslslssl"
  return write_jsonl(tmp_path / "mixed.jsonl", [LONG if k == "l" else SHORT for k in kinds])


def test_truncate_counts_and_cuts(sp, mixed_lengths):
  config = make_config(dataset_path=mixed_lengths, max_target_length=24, packing=False, data_shuffle=False,
                       process_batch_size=2)
  iterator = pipeline.make_train_iterator(config, sp)
  batches = take(iterator, 3)  # the first 6 examples: s l s s l s
  assert pipeline.data_stats(iterator) == {"truncated": 2, "dropped": 0}
  full = np.concatenate([b["segment_ids"] for b in batches])
  np.testing.assert_array_equal(full.sum(axis=1) == 24, [False, True, False, False, True, False])
  long_ids = [sp.bos_id] + sp.encode(LONG["prompt"]) + sp.encode(LONG["completion"])
  np.testing.assert_array_equal(batches[0]["inputs"][1], long_ids[:24])
  np.testing.assert_array_equal(batches[0]["targets"][1], long_ids[1:25])


def test_drop_counts_and_skips(sp, mixed_lengths):
  config = make_config(dataset_path=mixed_lengths, max_target_length=24, packing=False, data_shuffle=False,
                       process_batch_size=2, long_examples="drop")
  iterator = pipeline.make_train_iterator(config, sp)
  batches = take(iterator, 3)  # the first 6 short examples, skipping the 3 long ones before the sixth
  assert pipeline.data_stats(iterator) == {"truncated": 0, "dropped": 3}
  short_length = len(sp.encode(SHORT["prompt"]) + sp.encode(SHORT["completion"])) + 1
  assert all(np.all(b["segment_ids"].sum(axis=1) == short_length) for b in batches)
  take(iterator, 3)  # the 6 shorts of the second epoch: the last long of epoch 1 and the first 3 of epoch 2
  assert pipeline.data_stats(iterator) == {"truncated": 0, "dropped": 7}


def test_all_examples_dropped_is_an_error(sp, tmp_path):
  path = write_jsonl(tmp_path / "long.jsonl", [LONG] * 4)
  config = make_config(dataset_path=path, max_target_length=24, long_examples="drop")
  with pytest.raises(UserError, match="too long for max_target_length"):
    next(pipeline.make_train_iterator(config, sp))


def test_too_few_examples_is_an_error(sp, tmp_path):
  path = write_jsonl(tmp_path / "tiny.jsonl", [SHORT] * 3)
  with pytest.raises(UserError, match=r"tiny\.jsonl has 3 examples but one training batch needs 4.*per_device_batch"):
    pipeline.make_train_iterator(make_config(dataset_path=path), sp)
  with pytest.raises(UserError, match="needs 6 .3 rows x 2 processes"):
    pipeline.make_train_iterator(make_config(dataset_path=path, process_batch_size=3, num_processes=2), sp)


@pytest.mark.parametrize("overrides", [{}, {"packing": False, "long_examples": "drop", "max_target_length": 40}])
def test_state_round_trip(sp, overrides):
  config = make_config(**overrides)
  iterator = pipeline.make_train_iterator(config, sp)
  take(iterator, 5)
  state = json.loads(json.dumps(iterator.get_state()))  # what a checkpoint stores
  stats = pipeline.data_stats(iterator)
  expected = take(iterator, 4)
  restored = pipeline.make_train_iterator(config, sp)
  restored.set_state(state)
  assert pipeline.data_stats(restored) == stats
  assert_batches_equal(take(restored, 4), expected)
  assert pipeline.data_stats(restored) == pipeline.data_stats(iterator)
  if overrides:
    assert pipeline.data_stats(iterator)["dropped"] > 0


def test_orbax_checkpoint_round_trip(sp, tmp_path):
  config = make_config(long_examples="drop", max_target_length=40)
  iterator = pipeline.make_train_iterator(config, sp)
  take(iterator, 3)
  manager = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
  manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
  expected, stats = take(iterator, 2), pipeline.data_stats(iterator)
  restored = pipeline.make_train_iterator(config, sp)
  manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  assert_batches_equal(take(restored, 2), expected)
  assert pipeline.data_stats(restored) == stats and stats["dropped"] > 0


@pytest.mark.parametrize("shuffle", [True, False])
def test_processes_split_the_global_batch_exactly(sp, tmp_path, shuffle):
  # 10 examples, 6 per global step: 5 steps cross two epoch boundaries.
  records = [json.loads(line) for line in open(EVAL)][:10]
  path = write_jsonl(tmp_path / "ten.jsonl", records)
  common = {"dataset_path": path, "packing": False, "data_shuffle": shuffle, "seed": 7}
  single = take(pipeline.make_train_iterator(make_config(process_batch_size=6, **common), sp), 5)
  per_process = [take(pipeline.make_train_iterator(
    make_config(process_batch_size=3, num_processes=2, process_index=p, **common), sp), 5) for p in range(2)]
  merged = [{k: np.concatenate([per_process[0][s][k], per_process[1][s][k]]) for k in b} for s, b in enumerate(single)]
  assert_batches_equal(merged, single)
  firsts = [text for b in single for text in prompt_texts(sp, b)]
  assert sorted(firsts[:10]) == sorted(r["prompt"] for r in records)  # each epoch sees every example once
  assert (firsts[:10] == [r["prompt"] for r in records]) != shuffle
  if shuffle:
    assert firsts[:10] != firsts[10:20]  # a new order each epoch


def test_shuffle_is_seeded(sp):
  a = next(pipeline.make_train_iterator(make_config(seed=1), sp))
  b = next(pipeline.make_train_iterator(make_config(seed=1), sp))
  c = next(pipeline.make_train_iterator(make_config(seed=2), sp))
  assert_batches_equal([a], [b])
  assert not np.array_equal(a["inputs"], c["inputs"])


# ------------------------------------------------------------------------------------------------------ eval

def test_eval_batches_pad_the_last_batch(sp, tmp_path):
  records = [json.loads(line) for line in open(EVAL)][:5]
  path = write_jsonl(tmp_path / "eval5.jsonl", records)
  batches = pipeline.make_eval_batches(make_config(eval_dataset_path=path, eval_batch_size=2, eval_steps=-1), sp)
  assert len(batches) == 3 and all(b["inputs"].shape == (2, 128) for b in batches)
  used = [b["segment_ids"][r].any() for b in batches for r in range(2)]
  assert used == [True] * 5 + [False]
  assert not batches[2]["loss_mask"][1].any()
  prompts = [text for b in batches for text in prompt_texts(sp, b)]
  assert prompts[:5] == [r["prompt"] for r in records]
  assert len(pipeline.make_eval_batches(make_config(eval_dataset_path=path, eval_batch_size=2, eval_steps=2), sp)) == 2
  # Two processes: the same number of batches each, rows dealt by the training rule, padding at the end.
  halves = [pipeline.make_eval_batches(
    make_config(eval_dataset_path=path, eval_batch_size=2, eval_steps=-1, num_processes=2, process_index=p), sp)
    for p in range(2)]
  assert [len(h) for h in halves] == [2, 2]
  one = pipeline.make_eval_batches(make_config(eval_dataset_path=path, eval_batch_size=4, eval_steps=-1), sp)
  assert_batches_equal([{k: np.concatenate([halves[0][s][k], halves[1][s][k]]) for k in one[0]} for s in range(2)], one)
  assert pipeline.make_eval_batches(make_config(eval_dataset_path=""), sp) == []


def test_sample_prompt(sp, tmp_path):
  assert pipeline.sample_prompt(make_config()) == json.loads(open(EVAL).readline())["prompt"]
  assert pipeline.sample_prompt(make_config(eval_dataset_path="")) == json.loads(open(TRAIN).readline())["prompt"]
  path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
  assert pipeline.sample_prompt(make_config(eval_dataset_path=path)) == CONVERSATION[:4]


def test_eval_bundled_set(sp):
  batches = pipeline.make_eval_batches(make_config(), sp)
  assert len(batches) == 4 and batches[0]["loss_mask"].dtype == np.float32 and batches[0]["inputs"].shape == (4, 128)


# ------------------------------------------------------------------------------------------------ arithmetic

@pytest.mark.parametrize("text,answer", [
  ("3 + 4 = 7. The answer is 7.", 7),
  ("The answer is 42.\n", 42),
  ("2 - 5 = -3. The answer is -3.", -3),
  ("The answer is 12. The answer is 12.", 12),
  ("x The answer is 8. and more", 8),
  ("The answer is 4.5.", None),
  ("The answer is 42", None),
  ("the answer is 42.", None),
  ("The answer is 3. The answer is 4.", None),
  ("The answer is forty.", None),
  ("", None),
])
def test_extract_answer(text, answer):
  assert arithmetic.extract_answer(text) == answer


def test_arithmetic_examples_are_consistent():
  rng = random.Random(0)
  for _ in range(2000):
    example = arithmetic.make_example(rng)
    assert example["prompt"].endswith("?\n") and 0 <= example["answer"] < 100
    assert arithmetic.extract_answer(example["completion"]) == example["answer"]
    assert arithmetic.extract_answer(example["prompt"]) is None
  train = {json.loads(line)["prompt"] for line in open(TRAIN)}
  assert not train & {json.loads(line)["prompt"] for line in open(EVAL)}


def test_problem_kind_matches_the_operators_of_the_reference_working():
  by_operators = {("+",): "a + b", ("-",): "a - b", ("*",): "a * b", ("+", "-"): "a + b - c"}
  rng = random.Random(1)
  seen = set()
  for _ in range(400):
    example = arithmetic.make_example(rng)
    operators = tuple(re.findall(r" ([-+*]) ", example["completion"]))
    assert arithmetic.problem_kind(example["prompt"]) == by_operators[operators]
    seen.add(operators)
  assert seen == set(by_operators)
  with pytest.raises(ValueError, match="not a bundled arithmetic problem"):
    arithmetic.problem_kind("What is 2 + 2?")
