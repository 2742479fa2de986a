"""The `tokenizers` (Rust) backend of memjax's CLIP tokenizer against its pure-Python
backend (every output of `encode_batch`) and `transformers.CLIPTokenizer` (ids).

test_tokenizer.py runs its reference comparisons (public prompt lists, hard cases,
random text, the Unicode tables, other config layouts) on both backends; this file
adds the captions only memjax can take (lone surrogates), and backend selection.
"""
import numpy as np
import pytest

from memjax.data import tokenizer, tokenizer_fast
from memjax.runtime.errors import ConfigError, InputError
from public_prompts import read_captions
from test_tokenizer import HARD_CASES, SD1_PAD, SD2_PAD

pytest.importorskip("tokenizers")

TRICKY = HARD_CASES + [
    "a long caption " * 40, "tok " * 75, "tok " * 76,  # > 75 tokens; exactly 75; 76.
    "Tom &amp; Jerry &lt;3 &quot;quoted&quot;", "wow!!!", "!", "!!", "a!b! !c", " ! ",
    "<|endoftext|><|endoftext|>", "x<|startoftext|>y<|endoftext|>z", "<|endoftext",
    "<|STARTOFTEXT|>!<|EndOfText|>", "ΣΣ ς Σ", "Ⅷ ① ²³ ٣ 五", "tab\tnew\nline\u2028sep",
]
SURROGATES = ["\ud800 lone \udfff surrogates", "\udc80" * 3, "é\ud83d", "ok \udfff!"]


@pytest.fixture(scope="module", params=[(None, SD1_PAD), (None, SD2_PAD), (2000, SD2_PAD)],
                ids=["full-sd1", "full-sd2", "2000-sd2"])
def folder(request, tmp_path_factory):
  num_merges, pad = request.param
  path = str(tmp_path_factory.mktemp("tokenizer"))
  tokenizer.write_tokenizer_folder(path, num_merges=num_merges, pad_token=pad)
  return path


def test_rust_equals_python_on_every_output(folder):
  texts = read_captions() + TRICKY + SURROGATES
  fast = tokenizer.CLIPTokenizer.from_folder(folder, backend="rust")
  slow = tokenizer.CLIPTokenizer.from_folder(folder, backend="python")
  assert (fast.backend, slow.backend) == ("rust", "python")
  got, want = fast.encode_batch(texts), slow.encode_batch(texts)
  assert sorted(got) == sorted(want) == ["input_ids", "n_tokens", "truncated"]
  for key in want:
    assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
    bad = np.flatnonzero((got[key] != want[key]).reshape(len(texts), -1).any(axis=1))
    assert not bad.size, f"{key}: {[texts[i][:60] for i in bad[:5]]}"
  assert want["truncated"].any() and not want["truncated"].all()
  assert fast.encode_batch([])["input_ids"].shape == (0, 77)


def test_rust_matches_transformers_on_tricky_captions(folder):
  transformers = pytest.importorskip("transformers")
  ref = transformers.CLIPTokenizer.from_pretrained(folder)
  out = tokenizer.CLIPTokenizer.from_folder(folder, backend="rust").encode_batch(TRICKY)
  want = ref(TRICKY, padding="max_length", max_length=77, truncation=True)["input_ids"]
  n_tokens = [len(ids) for ids in ref(TRICKY, add_special_tokens=False)["input_ids"]]
  assert out["input_ids"].tolist() == want
  assert out["n_tokens"].tolist() == n_tokens
  assert out["truncated"].tolist() == [n > 75 for n in n_tokens]


def test_backend_selection(tmp_path, monkeypatch):
  tokenizer.write_tokenizer_folder(str(tmp_path), num_merges=300)
  assert tokenizer.CLIPTokenizer.from_folder(str(tmp_path)).backend == "rust"
  with pytest.raises(ConfigError, match="backend must"):
    tokenizer.CLIPTokenizer.from_folder(str(tmp_path), backend="fast")
  with pytest.raises(InputError, match="caption 1"):
    tokenizer.CLIPTokenizer.from_folder(str(tmp_path)).encode_batch(["fine", b"bytes"])
  monkeypatch.setattr(tokenizer_fast, "tokenizers", None)  # as where it is not installed
  assert tokenizer.CLIPTokenizer.from_folder(str(tmp_path)).backend == "python"
  with pytest.raises(ConfigError, match="tokenizers"):
    tokenizer.CLIPTokenizer.from_folder(str(tmp_path), backend="rust")
