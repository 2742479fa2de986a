"""CLIP's byte-level BPE tokenizer in pure Python (no torch, no transformers).

The scoring path tokenizes captions where only JAX is installed, and must give the
ids of the PyTorch reference: `transformers.CLIPTokenizer` (5.24, backed by
`tokenizers`) loaded from a diffusers `tokenizer/` folder, called with
`padding="max_length", max_length=77, truncation=True`. That reference:

1. splits the raw text on the special tokens whose `normalized` flag is false
   (SD1: `<|endoftext|>`; SD2 also `!`, its pad token), which map to their ids;
2. normalizes the rest: NFC, whitespace runs to one space (no effect on the ids,
   so skipped here), lower-casing per character (no final sigma, unlike
   `str.lower`), then splits again on the tokens whose `normalized` flag is true;
3. cuts the rest with CLIP's regex (keeping only the matches), each piece again
   with GPT-2's regex (`ByteLevel(use_regex=True)`; it only changes the literals
   `<|startoftext|>`/`<|endoftext|>`), maps UTF-8 bytes to CLIP's byte alphabet
   and runs BPE with `</w>` on the last symbol;
4. keeps the first `max_length - 2` tokens, adds BOS and EOS, pads.

No ftfy and no HTML unescaping: the fast tokenizer does neither (OpenAI's and
open_clip's tokenizers do, so their ids differ on captions such as `&amp;`).

The tables in assets/clip_unicode.json make the character classes, NFC and
lower-casing those of the reference (Oniguruma: Unicode 15.0; its NFC crate: older
data; Rust: Unicode 16). They come from comparing every code point with `regex`
2026.11.19 and Python 3.11 (Unicode 14.0); under another Python, characters
assigned after Unicode 13 may still be lower-cased or reordered differently.

Where `tokenizers` is installed, `encode_batch` runs the reference's own Rust
tokenizer instead (tokenizer_fast.py): the same ids, by construction under any Python.
"""
import functools
import gzip
import json
import os
import re
import unicodedata

import numpy as np
import regex

from memjax.data import tokenizer_fast
from memjax.runtime.errors import ConfigError, InputError

_ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
CLIP_MERGES_PATH = os.path.join(_ASSETS, "bpe_simple_vocab_16e6.txt.gz")
# CLIP reads merges[1 : 49152 - 256 - 2 + 1] of its file (line 0 is a header).
CLIP_NUM_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_DEFAULTS = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}

# Where the reference's Unicode data differs from `regex`'s and Python's; see the file.
with open(os.path.join(_ASSETS, "clip_unicode.json"), encoding="utf-8") as _f:
  _TABLES = json.load(_f)


def _ranges(key):
  """A `regex` class of the code points listed under `key` in the tables."""
  items = [item.partition("-") for item in _TABLES[key].split()]
  return "[%s]" % "".join("\\U%08X" % int(a, 16) + ("-\\U%08X" % int(b, 16) if b else "")
                          for a, _, b in items)


_L = r"[\p{L}--%s]" % _ranges("not_letter_ranges")
_N = r"[\p{N}--%s]" % _ranges("not_number_ranges")
_OTHER = r"[^\s\p{L}\p{N}--%s%s]" % (_ranges("not_letter_ranges"), _ranges("not_number_ranges"))
_CLIP_PAT = regex.compile(
    r"(?V1)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|%s+|%s|%s+"
    % (_L, _N, _OTHER))
_GPT2_PAT = regex.compile(
    r"(?V1)'s|'t|'re|'ve|'m|'ll|'d| ?%s+| ?%s+| ?%s+|\s+(?!\S)|\s+" % (_L, _N, _OTHER))
_INERT_PAT = regex.compile("(%s)" % _ranges("nfc_inert_ranges"))
_WHITESPACE = regex.compile(r"\s+")
# The same on lower-cased ASCII, where Oniguruma's \s is [\t\n\v\f\r ].
_CLIP_ASCII_PAT = re.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\t\n\v\f\r a-z0-9]+")
_SURROGATE = regex.compile(r"[\ud800-\udfff]")


def _lower_table():
  table = {0x03A3: "\u03c3"}  # Σ -> σ everywhere: Rust has no final-sigma rule.
  for item in _TABLES["lower_ranges"].split():
    src, dst = item.split(":")
    first, _, last = src.partition("-")
    for offset in range(int(last or first, 16) - int(first, 16) + 1):
      table[int(first, 16) + offset] = chr(int(dst, 16) + offset)
  return table


_LOWER = _lower_table()
_NEEDS_TABLE = regex.compile("[%s]" % "".join(map(chr, _LOWER)))


def _lower(text):
  """Lower-cases as Rust's `char::to_lowercase`, one character at a time."""
  if _NEEDS_TABLE.search(text):
    return "".join(_LOWER.get(ord(c)) or c.lower() for c in text)
  return text.lower()


def _nfc(text):
  """NFC as the reference computes it: inert characters split the text."""
  if not _INERT_PAT.search(text):
    return unicodedata.normalize("NFC", text)
  parts = _INERT_PAT.split(text)
  return "".join(p if i % 2 else unicodedata.normalize("NFC", p) for i, p in enumerate(parts))


@functools.lru_cache(maxsize=None)
def bytes_to_unicode():
  """CLIP's (and GPT-2's) reversible map from the 256 bytes to printable chars.

  Its order is the order of the vocabulary: the 188 printable bytes first (so `!`
  has id 0), then the others, mapped to chr(256 + n).
  """
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) +
               list(range(ord("®"), ord("ÿ") + 1)))
  others = [b for b in range(256) if b not in printable]
  return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


_BYTE_TABLE = str.maketrans({chr(b): c for b, c in bytes_to_unicode().items()})


def load_clip_merges(num_merges=None):
  """The first `num_merges` of CLIP's merges (all 48894 when None), as pairs."""
  with gzip.open(CLIP_MERGES_PATH, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")[1:CLIP_NUM_MERGES + 1]
  if num_merges is not None:
    if not 0 <= num_merges <= CLIP_NUM_MERGES:
      raise ValueError(f"num_merges must be in [0, {CLIP_NUM_MERGES}], got {num_merges}")
    lines = lines[:num_merges]
  return [tuple(line.split()) for line in lines]


def write_tokenizer_folder(path, num_merges=None, pad_token=EOS):
  """Writes a diffusers `tokenizer/` folder with CLIP's vocabulary, or a prefix.

  The vocabulary is built as CLIP builds it: the 256 byte chars, the same with
  `</w>`, one token per merge, then BOS and EOS. Any prefix of the merges gives a
  consistent tokenizer (every merge result is in the vocabulary). The two JSON
  files copy the layout of the SD1 (`pad_token="<|endoftext|>"`) and SD2
  (`pad_token="!"`) checkpoints, so `transformers.CLIPTokenizer.from_pretrained`
  behaves on it exactly as on theirs.

  Returns:
    The vocabulary size, `512 + num_merges + 2` (49408 for all merges).
  """
  merges = load_clip_merges(num_merges)
  base = list(bytes_to_unicode().values())
  tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [BOS, EOS]
  if pad_token not in tokens:
    raise ValueError(f"pad_token {pad_token!r} is not in the vocabulary")
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
  with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  flags = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
  token_map = {"bos_token": dict(flags, content=BOS), "eos_token": dict(flags, content=EOS),
               "pad_token": pad_token, "unk_token": dict(flags, content=EOS)}
  config = {"add_prefix_space": False, "do_lower_case": True, "errors": "replace",
            "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}
  for key, value in token_map.items():
    config[key] = dict(value, __type="AddedToken") if isinstance(value, dict) else value
  for name, obj in (("special_tokens_map.json", token_map), ("tokenizer_config.json", config)):
    with open(os.path.join(path, name), "w", encoding="utf-8") as f:
      json.dump(dict(sorted(obj.items())), f, indent=2)
      f.write("\n")
  return len(tokens)


def _read_json(path):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise ConfigError(f"{path}: file not found") from None
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path}: cannot read JSON ({e})") from None


def _content(value, source, key):
  """The token string of a special token written as a string or a dict."""
  if isinstance(value, str):
    return value
  if not isinstance(value, dict) or not isinstance(value.get("content"), str):
    raise ConfigError(f"{source}: {key} must be a string or a dict with 'content'")
  for flag in ("lstrip", "rstrip", "single_word"):
    if value.get(flag):
      raise ConfigError(f"{source}: {key} sets {flag}=true, which memjax does not support")
  return value["content"]


def _read_vocab_and_merges(path):
  """vocab and merges from tokenizer.json if present (transformers prefers it), else
  from vocab.json and merges.txt; returns them with the file the merges came from."""
  json_path = os.path.join(path, "tokenizer.json")
  if os.path.exists(json_path):  # A folder saved by transformers 5 has only this.
    model = _read_json(json_path).get("model") or {}
    vocab, merges = model.get("vocab"), model.get("merges")
    if model.get("type") != "BPE" or not isinstance(vocab, dict) or not isinstance(merges, list):
      raise ConfigError(f"{json_path}: 'model' is not a BPE model with vocab and merges")
    merges = [m.split(" ") if isinstance(m, str) else m for m in merges]
    return vocab, merges, json_path
  vocab = _read_json(os.path.join(path, "vocab.json"))
  merges_path = os.path.join(path, "merges.txt")
  try:
    with open(merges_path, encoding="utf-8") as f:
      lines = f.read().split("\n")
  except OSError as e:
    raise ConfigError(f"{merges_path}: cannot read ({e.strerror})") from None
  return vocab, [l.split(" ") for l in lines if l and not l.startswith("#version")], merges_path


def _read_added_tokens(path, config):
  """Special tokens and the `normalized` flag of every added token, as transformers 5
  resolves them from tokenizer_config.json, special_tokens_map.json, tokenizer.json.

  Returns:
    ({bos_token, eos_token, unk_token, pad_token} -> token, {token -> normalized}).
  """
  config_path = os.path.join(path, "tokenizer_config.json")
  for key in ("additional_special_tokens", "extra_special_tokens"):
    if config.get(key):
      raise ConfigError(f"{config_path}: {key} is not supported by memjax")
  values = {key: (config[key], config_path) for key in _SPECIAL_KEYS if key in config}
  decoder = []  # (id, dict, source): the `added_tokens_decoder` transformers builds.
  if "added_tokens_decoder" in config:
    decoder = [(int(i), t, config_path) for i, t in config["added_tokens_decoder"].items()]
  else:  # Legacy layout (all diffusers checkpoints): the map file overrides the config.
    map_path = os.path.join(path, "special_tokens_map.json")
    if os.path.exists(map_path):
      values.update((k, (v, map_path)) for k, v in _read_json(map_path).items()
                    if k in _SPECIAL_KEYS)
    json_path = os.path.join(path, "tokenizer.json")
    if os.path.exists(json_path):
      decoder = [(t["id"], t, json_path) for t in _read_json(json_path).get("added_tokens", [])]
  specials = {key: _content(*values.get(key, (_DEFAULTS[key], config_path)), key)
              for key in _SPECIAL_KEYS}
  flags = {}
  for i, token, source in sorted(decoder, key=lambda d: d[0]):
    content = _content(dict(token), source, f"added token {i}")
    # An unset flag resolves to `not special`, and named special tokens become special.
    special = bool(token.get("special")) or content in specials.values()
    flags[content] = bool(token.get("normalized", not special))
  # transformers then re-adds the named special tokens that are not in the decoder,
  # in this order, and the last flags win: SD1's plain-string pad token makes
  # `<|endoftext|>` unnormalized. Plain strings get normalized=False, dicts default to it.
  decoded = set(flags)
  for key in _SPECIAL_KEYS:
    value = values.get(key, (_DEFAULTS[key],))[0]
    if specials[key] not in decoded:
      flags[specials[key]] = isinstance(value, dict) and bool(value.get("normalized", False))
  return specials, flags


def _read_folder(path):
  """vocab, merges, special tokens, added-token flags and max length of a folder."""
  config_path = os.path.join(path, "tokenizer_config.json")
  config = _read_json(config_path)
  vocab, merges, merges_source = _read_vocab_and_merges(path)
  specials, flags = _read_added_tokens(path, config)
  max_length = config.get("model_max_length")
  if not isinstance(max_length, int) or max_length < 2:
    raise ConfigError(f"{config_path}: model_max_length must be an integer >= 2, "
                      f"got {max_length!r}")
  for i, merge in enumerate(merges):
    if len(merge) != 2 or any(t not in vocab for t in (*merge, "".join(merge))):
      raise ConfigError(f"{merges_source}: merge {i} {' '.join(map(str, merge))!r} is not a pair "
                        "of vocabulary tokens whose concatenation is in the vocabulary")
  return vocab, [tuple(m) for m in merges], specials, flags, max_length


class CLIPTokenizer:
  """CLIP BPE tokenizer that gives the ids of `transformers.CLIPTokenizer`."""

  def __init__(self, vocab, merges, specials, normalized_flags, model_max_length,
               source="<memory>", backend="auto"):
    """Builds the tokenizer; `CLIPTokenizer.from_folder` is the usual way.

    Args:
      vocab: token -> id.
      merges: BPE merges, highest priority first, as (left, right) pairs.
      specials: `bos_token`, `eos_token`, `unk_token`, `pad_token` -> token string.
      normalized_flags: added token -> whether it is matched after normalization.
      model_max_length: length of every row of ids (77 for Stable Diffusion).
      source: where the tokenizer came from, for error messages.
      backend: what `encode_batch` runs: "rust" (`tokenizers`), "python", or
        "auto" (rust where `tokenizers` is installed); `self.backend` says which.
    """
    self.vocab = dict(vocab)
    self.model_max_length = model_max_length
    self._ranks = {pair: i for i, pair in enumerate(merges)}
    for key, token in list(specials.items()) + [(t, t) for t in normalized_flags]:
      if token not in self.vocab:
        raise ConfigError(f"{source}: {key} {token!r} is not in the vocabulary")
      if normalized_flags.get(token) and _WHITESPACE.search(token):
        # The reference collapses whitespace before matching these; memjax does not.
        raise ConfigError(f"{source}: normalized added token {token!r} contains whitespace")
    ids = {key: self.vocab[token] for key, token in specials.items()}
    self.bos_id, self.eos_id = ids["bos_token"], ids["eos_token"]
    self.unk_id, self.pad_id = ids["unk_token"], ids["pad_token"]
    self._added = {t: self.vocab[t] for t in normalized_flags}
    self._raw_split = self._splitter([t for t, n in normalized_flags.items() if not n])
    self._norm_split = self._splitter([t for t, n in normalized_flags.items() if n])
    self._cache = {}
    if backend not in ("auto", "rust", "python"):
      raise ConfigError(f"backend must be 'auto', 'rust' or 'python', got {backend!r}")
    self._fast = None if backend == "python" else tokenizer_fast.build(
        self.vocab, merges, specials["unk_token"], normalized_flags)
    if backend == "rust" and self._fast is None:
      raise ConfigError("backend 'rust' needs the `tokenizers` package, which is not installed")
    self.backend = "python" if self._fast is None else "rust"

  @classmethod
  def from_folder(cls, path, backend="auto"):
    """Reads a diffusers `tokenizer/` folder (vocab.json, merges.txt, configs)."""
    try:
      return cls(*_read_folder(path), source=path, backend=backend)
    except (TypeError, ValueError, AttributeError, KeyError) as e:  # Malformed JSON values.
      raise ConfigError(f"{path}: malformed tokenizer files ({type(e).__name__}: {e})") from None

  @staticmethod
  def _splitter(tokens):
    if not tokens:
      return None
    # Longest first, so the alternation finds the leftmost-longest match as the
    # reference's Aho-Corasick does; the group keeps the tokens in `split`.
    alternatives = sorted(tokens, key=lambda t: (-len(t), t))
    return regex.compile("(" + "|".join(map(regex.escape, alternatives)) + ")")

  def _bpe(self, symbols):
    """CLIP's BPE: merge the best-ranked adjacent pair everywhere, until none is left."""
    word = list(symbols)
    while len(word) > 1:
      pairs = [(self._ranks.get(p, len(self._ranks)), p) for p in zip(word, word[1:])]
      rank, pair = min(pairs)
      if rank == len(self._ranks):
        break
      merged, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == pair:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    return word

  def _piece_ids(self, piece):
    ids = self._cache.get(piece)
    if ids is None:
      ids = []
      for word in _GPT2_PAT.findall(piece):
        chars = word.encode("utf-8").decode("latin-1").translate(_BYTE_TABLE)
        symbols = list(chars[:-1]) + [chars[-1] + "</w>"]
        ids.extend(self.vocab.get(s, self.unk_id) for s in self._bpe(symbols))
      if len(self._cache) >= 1_000_000:  # Bound memory over millions of captions.
        self._cache.clear()
      self._cache[piece] = ids = tuple(ids)
    return ids

  def _normalized_ids(self, segment, out):
    if segment.isascii():  # Most captions: no NFC, and a 7x faster `re` pattern.
      segment, pattern = segment.lower(), _CLIP_ASCII_PAT
    else:
      segment, pattern = _lower(_nfc(segment)), _CLIP_PAT
    parts = self._norm_split.split(segment) if self._norm_split else [segment]
    for j, part in enumerate(parts):
      if j % 2:
        out.append(self._added[part])
      else:
        for piece in pattern.findall(part):
          out.extend(self._piece_ids(piece))

  def encode(self, text):
    """Token ids of `text` without BOS/EOS and without truncation."""
    if _SURROGATE.search(text):  # Not UTF-8 encodable, so the reference refuses them;
      text = _SURROGATE.sub("\ufffd", text)  # read them as errors="replace" would.
    out = []
    parts = self._raw_split.split(text) if self._raw_split else [text]
    for j, part in enumerate(parts):
      if j % 2:
        out.append(self._added[part])
      elif part:
        self._normalized_ids(part, out)
    return out

  def encode_batch(self, texts):
    """Tokenizes captions into fixed-length rows, as the reference does.

    Args:
      texts: N captions (any str).

    Returns:
      dict with `input_ids` int32 [N, model_max_length] (BOS, the first
      model_max_length - 2 tokens, EOS, then the pad id), `n_tokens` int32 [N]
      (tokens of the caption before truncation, without BOS/EOS) and `truncated`
      bool [N] (n_tokens > model_max_length - 2).
    """
    length = self.model_max_length
    input_ids = np.full((len(texts), length), self.pad_id, dtype=np.int32)
    n_tokens = np.zeros((len(texts),), dtype=np.int32)
    for row, text in enumerate(texts):
      if not isinstance(text, str):
        raise InputError(f"caption {row} is a {type(text).__name__}, not a str: {text!r:.80}")
    if self._fast is None:
      all_ids = map(self.encode, texts)
    else:  # Rust strings cannot hold lone surrogates: read them as `encode` does.
      all_ids = self._fast.encode_ids([t if t.isascii() else _SURROGATE.sub("\ufffd", t)
                                       for t in texts])
    for row, ids in enumerate(all_ids):
      n_tokens[row] = len(ids)
      ids = [self.bos_id] + ids[:length - 2] + [self.eos_id]
      input_ids[row, :len(ids)] = ids
    return {"input_ids": input_ids, "n_tokens": n_tokens, "truncated": n_tokens > length - 2}
