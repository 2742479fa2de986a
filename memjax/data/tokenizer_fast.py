"""The `tokenizers` (Rust) backend of memjax's CLIP tokenizer: the reference's own ids.

`transformers.CLIPTokenizer` (5.24) is itself a `tokenizers.Tokenizer`; `build`
makes the same one (its BPE model, normalizer and pre-tokenizer, copied from
transformers/models/clip/tokenization_clip.py) from the vocabulary, merges and
added-token flags that `memjax.data.tokenizer` reads from a `tokenizer/` folder.
So it needs neither transformers nor torch, and its ids are the reference's by
construction (no Unicode tables to keep in step); tests/test_tokenizer_fast.py
checks them against both the pure-Python tokenizer and transformers.

`tokenizers` is optional: `build` returns None where it is not installed, and
memjax then tokenizes in pure Python. Lone surrogates, which Rust strings cannot
hold, are replaced by U+FFFD before the call, as the pure-Python tokenizer reads
them. `encode_batch` runs on all cores (rayon) unless the environment sets
`TOKENIZERS_PARALLELISM=false` or `RAYON_NUM_THREADS`. Speed (benchmarks/RESULTS.md,
tokenizer_bench.py): about 17k captions/s on one core whatever the cache; the
pure-Python backend is faster on words it has seen, slower on new ones.
"""
try:
  import tokenizers
  from tokenizers import normalizers, pre_tokenizers
except ImportError:  # An optional dependency: the pure-Python path is used instead.
  tokenizers = None

# transformers' CLIPTokenizer: the split pattern of CLIP, as a Rust `Regex`.
_CLIP_SPLIT = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
               r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")


class RustCLIP:
  """A `tokenizers.Tokenizer` set up as transformers.CLIPTokenizer's backend."""

  def __init__(self, vocab, merges, unk_token, normalized_flags):
    model = tokenizers.models.BPE(vocab=dict(vocab), merges=[tuple(m) for m in merges],
                                  dropout=None, continuing_subword_prefix="",
                                  end_of_word_suffix="</w>", fuse_unk=False,
                                  unk_token=str(unk_token))
    tok = tokenizers.Tokenizer(model)
    tok.normalizer = normalizers.Sequence([
        normalizers.NFC(), normalizers.Replace(tokenizers.Regex(r"\s+"), " "),
        normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    # The special tokens with the `normalized` flags transformers resolves (the
    # pure-Python tokenizer's `_read_added_tokens`): SD2's pad token `!` is split
    # off the raw text, as in the reference.
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=bool(n))
                            for t, n in normalized_flags.items()])
    self._tok = tok

  def encode_ids(self, texts):
    """Token ids of each text (str, no lone surrogates), without BOS/EOS or truncation."""
    return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]


def build(vocab, merges, unk_token, normalized_flags):
  """A `RustCLIP`, or None where `tokenizers` is not installed."""
  if tokenizers is None:
    return None
  return RustCLIP(vocab, merges, unk_token, normalized_flags)
