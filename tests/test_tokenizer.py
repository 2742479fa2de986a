"""memjax's CLIP tokenizer against `transformers.CLIPTokenizer` (the reference).

The reference is loaded from folders that `write_tokenizer_folder` writes in the
layout of the SD1 and SD2 checkpoints, and called as the diffusers pipelines call
it: `padding="max_length", max_length=77, truncation=True`.
"""
import json
import os
import random
import shutil

import numpy as np
import pytest

from public_prompts import read_captions
from memjax.data import tokenizer, tokenizer_fast
from memjax.runtime.errors import ConfigError, InputError

SD1_PAD, SD2_PAD = "<|endoftext|>", "!"

HARD_CASES = [
    "", " ", "\n\t ", "a photo of a cat", "A PHOTO OF A CAT!!!",
    "word " * 100,  # > 75 tokens: truncated.
    "supercalifragilisticexpialidocious" * 12,
    "🙂🐱‍👤 emoji 👍🏽 ❤️", "Café résumé naïve Ångström e\u0301 ﬁ ½ ² Ⅻ",
    "東京タワー 北京の夜 서울 ภาษาไทย हिन्दी العربية", "ΣΑΣ ΟΔΥΣΣΕΥΣ İstanbul ß",
    "<b>bold</b> &amp; <a href='http://x.y/z?q=1&r=2'>link</a> &#39;",
    "a  b\n\nc\t\td\r\ne\u00a0f\u3000g\x0bh\x0ci\x1cj\x85k",
    "<|endoftext|>", "a<|endoftext|>b<|startoftext|>c", "<|ENDOFTEXT|> <|StartOfText|>",
    "it's I'M we'll THEY'D you've 'sup", "wow!!! hello! !", "3.14159 2026-11-28 #1 $5 100%",
    "\x00\x01\x7f\u200b\ufeff\ufffd", "\u20e6\u0899 D\u093c\u08cf \U00011935\U00011930",
    "\u1c89\U00010d50 \u0558\U00011de0",  # Letters/marks the reference's Unicode lacks.
]


@pytest.fixture(scope="module", params=[(None, SD1_PAD), (None, SD2_PAD), (2000, SD1_PAD),
                                        (2000, SD2_PAD)], ids=["full-sd1", "full-sd2",
                                                               "2000-sd1", "2000-sd2"])
def folder(request, tmp_path_factory):
  num_merges, pad = request.param
  path = str(tmp_path_factory.mktemp("tokenizer"))
  size = tokenizer.write_tokenizer_folder(path, num_merges=num_merges, pad_token=pad)
  assert size == 512 + (num_merges or tokenizer.CLIP_NUM_MERGES) + 2
  return path


def _assert_matches_reference(path, texts):
  """Both backends (rust where `tokenizers` is installed) give the reference's ids."""
  transformers = pytest.importorskip("transformers")
  ref = transformers.CLIPTokenizer.from_pretrained(path)
  want = ref(texts, padding="max_length", max_length=77, truncation=True)["input_ids"]
  n_tokens = np.array([len(ids) for ids in ref(texts, add_special_tokens=False)["input_ids"]])
  for backend in ("python", "rust") if tokenizer_fast.tokenizers else ("python",):
    ours = tokenizer.CLIPTokenizer.from_folder(path, backend=backend).encode_batch(texts)
    for i, text in enumerate(texts):
      assert ours["input_ids"][i].tolist() == want[i], f"{backend} row {i}: {text!r}"
    np.testing.assert_array_equal(ours["n_tokens"], n_tokens)
    np.testing.assert_array_equal(ours["truncated"], n_tokens > 75)


def test_matches_transformers_on_real_captions(folder):
  captions = read_captions()
  assert len(captions) >= 1200
  _assert_matches_reference(folder, captions)


def test_matches_transformers_on_hard_cases(folder):
  _assert_matches_reference(folder, HARD_CASES)
  out = tokenizer.CLIPTokenizer.from_folder(folder).encode_batch(HARD_CASES)
  assert out["truncated"].any() and not out["truncated"].all()


def test_matches_transformers_on_random_text(folder):
  rng = random.Random(0)
  pools = [[chr(c) for c in range(0x250)], list("aAsStTdDlLmM '!<|>\u0301\u03a3\t\n"),
           [chr(rng.randrange(0x110000)) for _ in range(500)]]
  texts = ["".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 30)))
           for _ in range(1500)]
  texts = [t.encode("utf-8", "replace").decode("utf-8") for t in texts]  # No surrogates.
  _assert_matches_reference(folder, texts)


def test_unicode_tables_match_transformers(tmp_path):
  """Every code point listed in clip_unicode.json, alone and between marks."""
  tokenizer.write_tokenizer_folder(str(tmp_path), num_merges=300)
  chars = []
  for key in ("not_letter_ranges", "not_number_ranges", "nfc_inert_ranges", "lower_ranges"):
    for item in tokenizer._TABLES[key].split():
      first, _, last = item.split(":")[0].partition("-")
      chars += [chr(c) for c in range(int(first, 16), int(last or first, 16) + 1)]
  chars = chars[::7] + chars[-50:]  # Every 7th keeps the test fast.
  _assert_matches_reference(str(tmp_path), [f"A{c}b \u0301{c}\u0316 {c}{c}" for c in chars])


def test_known_clip_ids(tmp_path):
  tokenizer.write_tokenizer_folder(str(tmp_path))
  with open(tmp_path / "vocab.json", encoding="utf-8") as f:
    vocab = json.load(f)
  assert [vocab[t] for t in ("!", "!</w>", "a</w>", "photo</w>", "of</w>", "cat</w>",
                             "<|startoftext|>", "<|endoftext|>")] == [
                                 0, 256, 320, 1125, 539, 2368, 49406, 49407]
  tok = tokenizer.CLIPTokenizer.from_folder(str(tmp_path))
  out = tok.encode_batch(["a photo of a cat", ""])
  assert out["input_ids"].dtype == np.int32 and out["input_ids"].shape == (2, 77)
  assert out["n_tokens"].dtype == np.int32 and out["truncated"].dtype == bool
  assert out["input_ids"][0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]
  assert out["input_ids"][1, :3].tolist() == [49406, 49407, 49407]
  assert out["n_tokens"].tolist() == [5, 0]


def test_reduced_vocabulary_is_consistent(tmp_path):
  """Every BPE output of a 1000-merge tokenizer is in its vocabulary (never unk)."""
  tokenizer.write_tokenizer_folder(str(tmp_path), num_merges=1000)
  tok = tokenizer.CLIPTokenizer.from_folder(str(tmp_path))
  rng = random.Random(1)
  for _ in range(300):
    word = "".join(chr(rng.choice([rng.randrange(32, 0x3000), rng.randrange(0x110000)]))
                   for _ in range(rng.randint(1, 12))).encode("utf-8", "replace").decode()
    for piece in tokenizer._GPT2_PAT.findall(word):
      chars = piece.encode("utf-8").decode("latin-1").translate(tokenizer._BYTE_TABLE)
      assert all(s in tok.vocab for s in tok._bpe(list(chars[:-1]) + [chars[-1] + "</w>"]))
  assert max(tok.encode("the quick brown fox jumps over the lazy dog")) < len(tok.vocab)


def test_never_raises_and_is_deterministic(tmp_path):
  tokenizer.write_tokenizer_folder(str(tmp_path), num_merges=500)
  rng = random.Random(2)
  texts = ["\ud800 lone \udfff surrogates", "\udc80" * 3,
           b"\xff\xfe bad".decode("utf-8", "replace")]
  texts += ["".join(chr(rng.randrange(0x110000)) for _ in range(rng.randint(0, 50)))
            for _ in range(300)]
  first = tokenizer.CLIPTokenizer.from_folder(str(tmp_path)).encode_batch(texts)
  again = tokenizer.CLIPTokenizer.from_folder(str(tmp_path))
  again.encode_batch(texts[::-1])  # A warm cache must not change anything.
  second = again.encode_batch(texts)
  for key in first:
    np.testing.assert_array_equal(first[key], second[key])
  # A lone surrogate is read as U+FFFD, as a bytes decode with errors="replace" gives.
  assert again.encode("\ud800") == again.encode("\ufffd")
  with pytest.raises(InputError, match="caption 1"):
    again.encode_batch(["fine", None])


def test_folder_saved_by_transformers(tmp_path):
  """transformers 5 saves only tokenizer.json + tokenizer_config.json."""
  transformers = pytest.importorskip("transformers")
  tokenizer.write_tokenizer_folder(str(tmp_path / "src"), num_merges=800, pad_token=SD2_PAD)
  transformers.CLIPTokenizer.from_pretrained(str(tmp_path / "src")).save_pretrained(
      str(tmp_path / "saved"))
  assert not os.path.exists(tmp_path / "saved" / "vocab.json")
  _assert_matches_reference(str(tmp_path / "saved"), HARD_CASES)


@pytest.mark.parametrize("layout", ["decoder", "plain_strings", "no_map"])
def test_config_layouts(tmp_path, layout):
  """Other layouts of tokenizer_config.json that change which tokens are split off."""
  path = str(tmp_path)
  tokenizer.write_tokenizer_folder(path, num_merges=300)
  with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
    config = json.load(f)
  token = lambda c, n: {"content": c, "lstrip": False, "normalized": n, "rstrip": False,
                        "single_word": False, "special": True}
  if layout == "decoder":  # As transformers 4.3x saves it.
    config.update(bos_token=tokenizer.BOS, eos_token=tokenizer.EOS, unk_token=tokenizer.EOS,
                  added_tokens_decoder={"812": token(tokenizer.BOS, False),
                                        "813": token(tokenizer.EOS, True)})
  elif layout == "plain_strings":
    config.update(bos_token=tokenizer.BOS, eos_token=tokenizer.EOS, unk_token=tokenizer.EOS)
  if layout != "decoder":
    os.remove(os.path.join(path, "special_tokens_map.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f)
  _assert_matches_reference(path, HARD_CASES)


def test_missing_or_bad_files_raise_config_error(tmp_path):
  src = str(tmp_path / "src")
  tokenizer.write_tokenizer_folder(src, num_merges=100)
  for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
    broken = str(tmp_path / name)
    shutil.copytree(src, broken)
    os.remove(os.path.join(broken, name))
    with pytest.raises(ConfigError, match=name):
      tokenizer.CLIPTokenizer.from_folder(broken)
  with open(os.path.join(src, "tokenizer_config.json"), encoding="utf-8") as f:
    config = json.load(f)
  for key, value, match in [("pad_token", "<pad>", "pad_token"),
                            ("model_max_length", None, "model_max_length"),
                            ("additional_special_tokens", ["<x>"], "additional_special_tokens")]:
    with open(os.path.join(src, "tokenizer_config.json"), "w", encoding="utf-8") as f:
      json.dump(dict(config, **{key: value}), f)
    if key == "pad_token":
      os.remove(os.path.join(src, "special_tokens_map.json"))
    with pytest.raises(ConfigError, match=match):
      tokenizer.CLIPTokenizer.from_folder(src)
