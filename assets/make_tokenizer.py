"""Trains the bundled tokenizers on assets/arithmetic/train.jsonl (run make_arithmetic.py first).

- assets/tokenizer.model: SentencePiece BPE, 512 pieces: pad 0, unk 1, BOS 2, EOS 3, then the chat-template
  markers and "\\n" as single pieces, 256 byte-fallback pieces (any text round-trips), digits split one per
  token (easier sums), no dummy prefix and identity normalisation (separately encoded prompt and
  completion decode back to exactly their concatenation).
- tests/fixtures/tokenizer.json: a byte-level Hugging Face `tokenizers` BPE (<pad> 0, <s> 1, </s> 2, the
  chat markers as added tokens, vocabulary <= 512), for tests of the tokenizer.json path.

Both are deterministic: one thread, no input sampling or shuffling; reruns give byte-identical files
(checked with sentencepiece 0.2.3 and tokenizers 0.23.3). Run from the repo root.
"""

import io
import json
import pathlib

import sentencepiece
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from tunix_core.data.chat import MARKERS

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = ROOT / "assets" / "arithmetic" / "train.jsonl"
SP_OUT = ROOT / "assets" / "tokenizer.model"
HF_OUT = ROOT / "tests" / "fixtures" / "tokenizer.json"
VOCAB_SIZE = 512


def _texts() -> list[str]:
  with open(TRAIN) as f:
    rows = [json.loads(line) for line in f]
  return [row["prompt"] + row["completion"] for row in rows]


def make_sentencepiece(texts: list[str]) -> bytes:
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
    sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=VOCAB_SIZE,
    character_coverage=1.0, byte_fallback=True, split_digits=True, add_dummy_prefix=False,
    normalization_rule_name="identity", remove_extra_whitespaces=False,
    user_defined_symbols=[*MARKERS, "\n"], pad_id=0, unk_id=1, bos_id=2, eos_id=3,
    num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2)
  return model.getvalue()


def make_huggingface(texts: list[str]) -> str:
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - len(MARKERS), special_tokens=["<pad>", "<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer)
  tok.add_tokens(list(MARKERS))
  return tok.to_str(pretty=True)


def main() -> None:
  texts = _texts()
  SP_OUT.write_bytes(make_sentencepiece(texts))
  HF_OUT.parent.mkdir(parents=True, exist_ok=True)
  HF_OUT.write_text(make_huggingface(texts))
  print(f"wrote {SP_OUT} and {HF_OUT}")


if __name__ == "__main__":
  main()
