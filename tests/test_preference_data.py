"""Preference data: interleaved chosen/rejected rows, completion-only loss, truncation and drop counters, iterator
state, processes, eval batches, errors, chat records, and the bundled correct-vs-wrong arithmetic pairs."""

import json
import pathlib

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml

from tunix_core.data import arithmetic, pipeline, preference
from tunix_core.data.tokenizer import load_tokenizer
from tunix_core.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
SP_MODEL = str(REPO / "assets" / "tokenizer.model")
QWEN2 = str(REPO / "end_to_end" / "hf_parity" / "tokenizers" / "qwen2")
TRAIN = str(REPO / "assets" / "arithmetic" / "preference_train.jsonl")
EVAL = str(REPO / "assets" / "arithmetic" / "preference_eval.jsonl")
BASE = yaml.safe_load((REPO / "configs" / "base.yml").read_text())
KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
BATCH_KEYS = (*KEYS, "pair_index")


def make_config(**overrides) -> ml_collections.FrozenConfigDict:
  """base.yml with the data keys these tests rely on pinned, plus the derived keys."""
  values = {**BASE, "dataset_type": "jsonl", "tokenizer_path": SP_MODEL, "dataset_path": TRAIN,
            "eval_dataset_path": EVAL, "prompt_field": "prompt", "chosen_field": "chosen",
            "rejected_field": "rejected", "chat_template": "", "add_bos": True, "add_eos": True,
            "completion_only_loss": True, "max_target_length": 128, "long_examples": "truncate",
            "data_shuffle": True, "seed": 0, "eval_steps": 4, "gradient_accumulation_steps": 1,
            "per_device_batch_size": 4.0, "process_index": 0, "num_processes": 1, "process_batch_size": 4,
            "eval_batch_size": 4}
  return ml_collections.FrozenConfigDict({**values, **overrides})


def write_jsonl(path: pathlib.Path, records: list) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def read_jsonl(path: str) -> list[dict]:
  return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def sp():
  return load_tokenizer(SP_MODEL)


def take(iterator, n: int) -> list[dict]:
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a: list[dict], b: list[dict]):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys() and set(KEYS) <= x.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def row(batch: dict, r: int) -> dict:
  """Row r's features over its sequence (padding cut off)."""
  n = int(batch["segment_ids"][r].sum())
  return {key: batch[key][r][:n] for key in KEYS}


def split_row(tok, batch: dict, r: int) -> tuple[list[int], str]:
  """(the ids of row r outside the loss, its decoded loss targets)."""
  x = row(batch, r)
  ids = list(x["inputs"]) + [x["targets"][-1]]
  return ids[:int(np.argmax(x["loss_mask"] == 1)) + 1], tok.decode(x["targets"][x["loss_mask"] == 1])


def masked_spans(tok, ids, mask) -> list[str]:
  spans, run = [], []
  for i, m in zip(list(ids) + [None], list(mask) + [0]):
    if m:
      run.append(i)
    elif run:
      spans.append(tok.decode(run))
      run = []
  return spans


# ------------------------------------------------------------------------------------------ row layout

def test_rows_interleave_chosen_and_rejected(sp):
  records = read_jsonl(TRAIN)
  pairs = {r["prompt"]: r for r in records}
  batches = take(preference.make_preference_iterator(make_config(process_batch_size=6), sp), 2)
  for batch in batches:
    assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
      "inputs": (np.int32, (6, 128)), "targets": (np.int32, (6, 128)), "loss_mask": (np.float32, (6, 128)),
      "segment_ids": (np.int32, (6, 128)), "positions": (np.int32, (6, 128)), "pair_index": (np.int32, (6,))}
    for i in range(3):
      chosen_prompt, chosen = split_row(sp, batch, 2 * i)
      rejected_prompt, rejected = split_row(sp, batch, 2 * i + 1)
      assert chosen_prompt == rejected_prompt  # the same prompt tokens: one pair
      record = pairs[sp.decode(chosen_prompt)]
      assert (chosen, rejected) == (record["chosen"], record["rejected"])
      # Both rows name the record they came from (what precomputed reference log-probs are looked up by).
      assert batch["pair_index"][2 * i] == batch["pair_index"][2 * i + 1]
      assert records[batch["pair_index"][2 * i]] == record
  for batch in batches:  # one sequence per row, from the left; positions count from 0; padding is all zeros
    for r in range(6):
      x, n = row(batch, r), int(batch["segment_ids"][r].sum())
      np.testing.assert_array_equal(x["segment_ids"], 1)
      np.testing.assert_array_equal(x["positions"], np.arange(n))
      np.testing.assert_array_equal(x["targets"][:-1], x["inputs"][1:])
      assert not any(batch[key][r][n:].any() for key in KEYS)


def test_loss_only_on_completion_tokens(sp):
  first = read_jsonl(TRAIN)[0]
  batch = next(preference.make_preference_iterator(make_config(data_shuffle=False), sp))
  prompt = [sp.bos_id] + sp.encode(first["prompt"])
  for r, completion in ((0, first["chosen"]), (1, first["rejected"])):
    x = row(batch, r)
    ids = sp.encode(completion) + [sp.eos_id]
    np.testing.assert_array_equal(x["inputs"], prompt + ids[:-1])
    np.testing.assert_array_equal(x["targets"], prompt[1:] + ids)
    np.testing.assert_array_equal(x["loss_mask"], [0] * (len(prompt) - 1) + [1] * len(ids))
    assert sp.decode(x["targets"][x["loss_mask"] == 1]) == completion  # decode hides the EOS, which is in the loss
  every = next(preference.make_preference_iterator(make_config(data_shuffle=False, completion_only_loss=False), sp))
  np.testing.assert_array_equal(every["loss_mask"], every["segment_ids"])


# ----------------------------------------------------------------------------------- long pairs, counters

PROMPT, SHORT, LONG = "Hi\n", "Yes.", " ".join(["1 + 1 = 2."] * 8)


@pytest.fixture
def mixed(tmp_path):
  # Pairs 1, 4 and 6 have a long rejected, chosen or both; the others are short.
  kinds = ["ss", "sl", "ss", "ss", "ls", "ss", "ll", "ss"]
  records = [{"prompt": PROMPT, "chosen": SHORT if k[0] == "s" else LONG, "rejected": SHORT if k[1] == "s" else LONG}
             for k in kinds]
  return write_jsonl(tmp_path / "mixed.jsonl", records)


def test_truncate_cuts_both_and_counts(sp, mixed):
  config = make_config(dataset_path=mixed, max_target_length=24, data_shuffle=False)
  iterator = preference.make_preference_iterator(config, sp)
  batches = take(iterator, 2)  # pairs 0-3
  assert preference.data_stats(iterator) == {"truncated": 1, "dropped": 0}
  lengths = np.concatenate([b["segment_ids"].sum(axis=1) for b in batches])
  short = len(sp.encode(PROMPT) + sp.encode(SHORT)) + 1
  np.testing.assert_array_equal(lengths, [short, short, short, 24, short, short, short, short])
  long_ids = [sp.bos_id] + sp.encode(PROMPT) + sp.encode(LONG)
  np.testing.assert_array_equal(batches[0]["inputs"][3], long_ids[:24])
  np.testing.assert_array_equal(batches[0]["targets"][3], long_ids[1:25])
  take(iterator, 2)
  assert pipeline.data_stats(iterator) == {"truncated": 3, "dropped": 0}  # pipeline's reader works too


def test_truncate_keeps_the_completion_start_after_a_long_prompt(sp, tmp_path):
  long_prompt = "Tell me. " * 20 + "\n"
  records = [{"prompt": long_prompt, "chosen": "The answer is 4.", "rejected": "It is 5."},  # completions fit
             {"prompt": long_prompt, "chosen": "The answer is 4.", "rejected": LONG}]  # the prompt keeps half
  path = write_jsonl(tmp_path / "p.jsonl", records)
  config = make_config(dataset_path=path, max_target_length=32, data_shuffle=False)
  iterator = preference.make_preference_iterator(config, sp)
  batch = next(iterator)
  assert preference.data_stats(iterator) == {"truncated": 2, "dropped": 0}
  prompt_ids = [sp.bos_id] + sp.encode(long_prompt)
  for p, record in enumerate(records):
    completions = [sp.encode(record[k]) + [sp.eos_id] for k in ("chosen", "rejected")]
    keep = max(33 - max(map(len, completions)), 33 // 2)
    assert keep < len(prompt_ids)
    for r, completion in zip((2 * p, 2 * p + 1), completions):
      x = row(batch, r)
      ids = list(x["inputs"]) + [x["targets"][-1]]
      assert ids == prompt_ids[:keep] + completion[:33 - keep]  # the same prompt cut in both rows
      np.testing.assert_array_equal(x["loss_mask"], [0] * (keep - 1) + [1] * len(completion[:33 - keep]))
  assert keep == 16 and batch["segment_ids"][3].sum() == 32


def test_drop_removes_pairs_and_counts(sp, mixed):
  config = make_config(dataset_path=mixed, max_target_length=24, data_shuffle=False, long_examples="drop")
  iterator = preference.make_preference_iterator(config, sp)
  batches = take(iterator, 2)  # pairs 0, 2, 3, 5: skipping 1 and 4
  assert preference.data_stats(iterator) == {"truncated": 0, "dropped": 2}
  assert all(b["segment_ids"].sum(axis=1).max() < 24 for b in batches)
  take(iterator, 2)  # 7, then the next epoch's 0, 2, 3: skipping 6 and 1
  assert preference.data_stats(iterator) == {"truncated": 0, "dropped": 4}


def test_all_pairs_dropped_is_an_error(sp, tmp_path):
  path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": PROMPT, "chosen": LONG, "rejected": SHORT}] * 4)
  with pytest.raises(UserError, match="too long for max_target_length"):
    next(preference.make_preference_iterator(make_config(dataset_path=path, max_target_length=24,
                                                         long_examples="drop"), sp))


# ------------------------------------------------------------------------------------- state, processes

def test_state_round_trip(sp, mixed):
  config = make_config(dataset_path=mixed, max_target_length=24, long_examples="drop")
  iterator = preference.make_preference_iterator(config, sp)
  take(iterator, 5)
  state = json.loads(json.dumps(iterator.get_state()))  # what a checkpoint stores
  stats = preference.data_stats(iterator)
  expected = take(iterator, 4)
  restored = preference.make_preference_iterator(config, sp)
  restored.set_state(state)
  assert preference.data_stats(restored) == stats and stats["dropped"] > 0
  assert_batches_equal(take(restored, 4), expected)
  assert preference.data_stats(restored) == preference.data_stats(iterator)


def test_orbax_checkpoint_round_trip(sp, tmp_path):
  config = make_config(process_batch_size=2)
  iterator = preference.make_preference_iterator(config, sp)
  take(iterator, 3)
  manager = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
  manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
  expected = take(iterator, 2)
  restored = preference.make_preference_iterator(config, sp)
  manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  assert_batches_equal(take(restored, 2), expected)


@pytest.mark.parametrize("shuffle", [True, False])
def test_processes_split_the_global_batch_exactly(sp, tmp_path, shuffle):
  # 5 pairs, 4 per global step (8 rows), 2 per process: 4 steps cross three epoch boundaries.
  records = read_jsonl(EVAL)[:5]
  common = {"dataset_path": write_jsonl(tmp_path / "five.jsonl", records), "data_shuffle": shuffle, "seed": 7}
  single = take(preference.make_preference_iterator(make_config(process_batch_size=8, **common), sp), 4)
  per_process = [take(preference.make_preference_iterator(
    make_config(process_batch_size=4, num_processes=2, process_index=p, **common), sp), 4) for p in range(2)]
  merged = [{k: np.concatenate([per_process[0][s][k], per_process[1][s][k]]) for k in b} for s, b in enumerate(single)]
  assert_batches_equal(merged, single)
  prompts = [sp.decode(split_row(sp, b, r)[0]) for b in single for r in range(0, 8, 2)]
  assert sorted(prompts[:5]) == sorted(r["prompt"] for r in records)  # each epoch sees every pair once
  assert (prompts[:5] == [r["prompt"] for r in records]) != shuffle


# ----------------------------------------------------------------------------------------------- eval

def test_eval_batches(sp, tmp_path):
  records = read_jsonl(EVAL)[:3]
  path = write_jsonl(tmp_path / "eval3.jsonl", records)
  batches = preference.make_preference_eval_batches(make_config(eval_dataset_path=path, eval_steps=-1), sp)
  assert len(batches) == 2 and all(b["inputs"].shape == (4, 128) for b in batches)
  rows = [(b, r) for b in batches for r in range(4)]
  assert [bool(b["loss_mask"][r].any()) for b, r in rows] == [True] * 6 + [False] * 2  # a padding pair
  assert not batches[1]["segment_ids"][2:].any()
  completions = [split_row(sp, b, r)[1] for b, r in rows[:6]]
  assert completions == [c for record in records for c in (record["chosen"], record["rejected"])]
  assert [int(b["pair_index"][r]) for b, r in rows] == [0, 0, 1, 1, 2, 2, -1, -1]
  halves = [preference.make_preference_eval_batches(
    make_config(eval_dataset_path=path, eval_steps=-1, eval_batch_size=2, num_processes=2, process_index=p), sp)
    for p in range(2)]
  assert [len(h) for h in halves] == [2, 2]
  assert_batches_equal([{k: np.concatenate([halves[0][s][k], halves[1][s][k]]) for k in BATCH_KEYS}
                        for s in range(2)], batches)
  assert len(preference.make_preference_eval_batches(make_config(), sp)) == 4
  assert preference.make_preference_eval_batches(make_config(eval_dataset_path=""), sp) == []
  dropped = preference.make_preference_eval_batches(
    make_config(eval_dataset_path=path, eval_steps=-1, max_target_length=12, long_examples="drop"), sp)
  assert not any(b["loss_mask"].any() for b in dropped)


def test_reference_pass_covers_every_pair_once(sp, tmp_path):
  """make_preference_pass (precompute_reference's pass): every pair of the split exactly once over the processes,
  ignoring eval_steps, in file order; padding rows name no pair."""
  records = read_jsonl(TRAIN)[:5]
  path = write_jsonl(tmp_path / "five.jsonl", records)
  seen = []
  for p in range(2):
    num_pairs, batches = preference.make_preference_pass(
      make_config(dataset_path=path, eval_steps=1, eval_batch_size=2, num_processes=2, process_index=p), sp, "train")
    assert num_pairs == 5 and len(batches) == 3
    for batch in batches:
      for r in range(0, 2, 2):
        index = int(batch["pair_index"][r])
        seen.append(index)
        if index >= 0:
          assert split_row(sp, batch, r)[1] == records[index]["chosen"]
          assert split_row(sp, batch, r + 1)[1] == records[index]["rejected"]
  assert sorted(seen) == [-1, 0, 1, 2, 3, 4]
  assert preference.make_preference_pass(make_config(eval_dataset_path=""), sp, "eval") == (0, [])


# --------------------------------------------------------------------------------------------- errors

def test_odd_batches_are_an_error(sp):
  with pytest.raises(UserError, match=r"per_device_batch_size=.*3 rows per process batch.*rows count chosen and "
                                      r"rejected separately"):
    preference.make_preference_iterator(make_config(process_batch_size=3), sp)
  with pytest.raises(UserError, match=r"1 rows per micro-batch.*rows count chosen and rejected separately"):
    preference.make_preference_iterator(make_config(process_batch_size=2, gradient_accumulation_steps=2), sp)
  with pytest.raises(UserError, match=r"per_device_batch_size=.*rows count chosen and rejected separately"):
    preference.make_preference_eval_batches(make_config(eval_batch_size=3), sp)


def test_record_errors_name_file_line_and_field(sp, tmp_path):
  good = {"prompt": "a", "chosen": "b", "rejected": "c"}
  cases = [
    ({"prompt": "a", "chosen": "b"}, r"line 2: the record has no 'rejected' \(set chosen_field/rejected_field"),
    ({"prompt": "a"}, r"line 2: the record has no 'chosen' and no 'rejected'"),
    ({"chosen": "b", "rejected": "c"}, r"line 2: the record has no 'prompt' \(set prompt_field"),
    ({"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": "c"}, r"line 2: 'prompt' is text"),
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": {"role": "assistant"}, "rejected": "c"},
     r"line 2: 'chosen' must be a chat message"),
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": {"role": "user", "content": "b"},
      "rejected": {"role": "assistant", "content": "c"}},
     r"line 2: 'chosen' has no assistant message after the prompt"),
  ]
  for record, message in cases:
    path = write_jsonl(tmp_path / "bad.jsonl", [good, record])
    with pytest.raises(UserError, match=r"dataset_path=.*bad\.jsonl, " + message):
      preference.make_preference_iterator(make_config(dataset_path=path), sp)
  path = write_jsonl(tmp_path / "renamed.jsonl", [{"q": "a", "good": "b", "bad": "c"}] * 2)
  config = make_config(dataset_path=path, prompt_field="q", chosen_field="good", rejected_field="bad",
                       process_batch_size=2)
  assert split_row(sp, next(preference.make_preference_iterator(config, sp)), 1)[1] == "c"
  with pytest.raises(UserError, match=r"has 2 pairs but one training batch needs 3"):
    preference.make_preference_iterator(make_config(dataset_path=path, prompt_field="q", chosen_field="good",
                                                    rejected_field="bad", process_batch_size=6), sp)


# ----------------------------------------------------------------------------------------------- chat

PROMPT_MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3 + 4?"},
                   {"role": "assistant", "content": "7."}, {"role": "user", "content": "And 2 more?"}]
CHOSEN, REJECTED = "7 + 2 = 9. The answer is 9.", "7 + 2 = 8. The answer is 8."
CHAT_RECORDS = [
  {"prompt": PROMPT_MESSAGES, "chosen": {"role": "assistant", "content": CHOSEN},
   "rejected": [{"role": "assistant", "content": REJECTED}]},
  # The implicit-prompt form: whole conversations, the prompt being the messages they share.
  {"chosen": PROMPT_MESSAGES + [{"role": "assistant", "content": CHOSEN}],
   "rejected": PROMPT_MESSAGES + [{"role": "assistant", "content": REJECTED}]},
]


@pytest.mark.parametrize("tokenizer_path,turn_end", [(SP_MODEL, "<|end|>"), (QWEN2, "<|im_end|>\n")])
def test_chat_records_loss_on_the_completion_turn_only(tmp_path, tokenizer_path, turn_end):
  tok = load_tokenizer(tokenizer_path)
  path = write_jsonl(tmp_path / "chat.jsonl", CHAT_RECORDS)
  config = make_config(dataset_path=path, tokenizer_path=tokenizer_path, data_shuffle=False)
  batch = next(preference.make_preference_iterator(config, tok))
  builtin = tokenizer_path == SP_MODEL
  for r, completion in enumerate([CHOSEN, REJECTED] * 2):
    x = row(batch, r)
    # Only the completion's assistant turn is in the loss, not the prompt's "7." turn.
    ids = tok.encode(completion + turn_end) + ([tok.eos_id] if builtin else [])
    np.testing.assert_array_equal(x["targets"][x["loss_mask"] == 1], ids)
    prompt = pipeline.prompt_ids(config, tok, PROMPT_MESSAGES)
    assert list(x["inputs"][:len(prompt)]) == prompt  # what the sampler continues from
    assert not x["loss_mask"][:len(prompt) - 1].any() and x["loss_mask"][len(prompt) - 1] == 1
  if not builtin:
    assert "<|im_start|>assistant\n7.\n<|im_start|>user" in tok.decode(batch["inputs"][0])  # decode hides <|im_end|>
  assert_batches_equal([{k: batch[k][:2] for k in KEYS}], [{k: batch[k][2:] for k in KEYS}])  # both forms agree


# ------------------------------------------------------------------------------------ the bundled task

def test_bundled_pairs_are_correct_versus_wrong():
  train, evaluation = read_jsonl(TRAIN), read_jsonl(EVAL)
  assert len(train) == 5000 and len(evaluation) == 200
  for record in train + evaluation:
    chosen, rejected = arithmetic.extract_answer(record["chosen"]), arithmetic.extract_answer(record["rejected"])
    assert chosen == record["answer"] and rejected is not None and rejected != chosen and rejected >= 0
    # The same working up to the last equation's result.
    head = record["chosen"].rsplit("= ", 1)[0]
    assert record["rejected"].startswith(head)
    assert record["rejected"].endswith(f"= {rejected}. The answer is {rejected}.")
  sft_eval = {r["prompt"] for r in read_jsonl(str(REPO / "assets" / "arithmetic" / "eval.jsonl"))}
  assert not {r["prompt"] for r in train} & ({r["prompt"] for r in evaluation} | sft_eval)
