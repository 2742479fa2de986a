"""Host-side caption throughput: tokenization and parquet reading (issue 17 item 5).

    python benchmarks/tokenizer_bench.py --target=20000 --repeats=3

The public prompt lists (tests/data: 500 + 219 memorized, 500 non-memorized) are
repeated to --target captions and tokenized with memjax's CLIP tokenizer
(`encode_batch`, the call the stages make, SD1 folder with all merges) on
  python: the pure-Python BPE, one core;
  rust-1: the `tokenizers` backend with TOKENIZERS_PARALLELISM=false, one core;
  rust-N: the same on all cores (rayon);
each as captions/s, median of --repeats, after one warm-up pass (so both caches
hold the words: repeated lists favour caches; "cold" is a fresh tokenizer's first
pass over the unique captions; python "no_cache": its word cache emptied before
every caption, CPU time). CPU s per caption (`time.process_time`) is printed
beside wall time: on a shared machine it is the steadier one-core figure. Then
memjax's own parquet reader (`tables.open_prompts(...).read_prompts` in chunks of
--chunk rows, caption cleaning included) on a file of those captions. Prints JSON.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from memjax.data import tables, tokenizer  # noqa: E402
from public_prompts import read_captions  # noqa: E402  (tests/public_prompts.py)

def _timed(fn, repeats):
  """(median wall s, median CPU s) of fn()."""
  walls, cpus = [], []
  for _ in range(repeats):
    w, c = time.perf_counter(), time.process_time()
    fn()
    walls.append(time.perf_counter() - w)
    cpus.append(time.process_time() - c)
  return statistics.median(walls), statistics.median(cpus)


def bench_tokenizers(folder, unique, texts, repeats):
  out = {}
  for name, backend, parallel in (("python", "python", "false"), ("rust-1", "rust", "false"),
                                  ("rust-N", "rust", "true")):
    os.environ["TOKENIZERS_PARALLELISM"] = parallel
    tok = tokenizer.CLIPTokenizer.from_folder(folder, backend=backend)
    cold, _ = _timed(lambda: tok.encode_batch(unique), 1)
    tok.encode_batch(texts)  # warm-up
    wall, cpu = _timed(lambda: tok.encode_batch(texts), repeats)
    out[name] = {"captions_per_s": round(len(texts) / wall),
                 "cpu_captions_per_s": round(len(texts) / cpu),
                 "cold_captions_per_s": round(len(unique) / cold)}
  py = out["python"]
  tok = tokenizer.CLIPTokenizer.from_folder(folder, backend="python")

  def no_cache():  # the worst case: every caption's words are new to the cache
    for text in unique:
      tok._cache.clear()  # pylint: disable=protected-access
      tok.encode_batch([text])

  py["no_cache_captions_per_s"] = round(len(unique) / _timed(no_cache, 1)[1])
  for name in ("rust-1", "rust-N"):
    out[name]["ratio_to_python"] = round(out[name]["captions_per_s"] / py["captions_per_s"], 1)
  out["rust-1"]["cpu_ratio_to_python"] = round(
      out["rust-1"]["cpu_captions_per_s"] / py["cpu_captions_per_s"], 1)
  return out


def bench_parquet(texts, repeats, chunk):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "captions.parquet")
    pq.write_table(pa.table({"caption": texts, "url": [f"http://x/{i}" for i in
                                                       range(len(texts))]}), path)

    def read():
      table = tables.open_prompts(path, "caption", None)
      for lo in range(0, table.num_rows, chunk):
        table.read_prompts(lo, min(lo + chunk, table.num_rows))

    read()
    wall, cpu = _timed(read, repeats)
  return {"captions_per_s": round(len(texts) / wall), "cpu_captions_per_s": round(len(texts) / cpu),
          "chunk_rows": chunk}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--target", type=int, default=20000)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--chunk", type=int, default=1024)
  args = parser.parse_args()
  unique = read_captions()
  texts = (unique * (args.target // len(unique) + 1))[:args.target]
  with tempfile.TemporaryDirectory() as folder:
    tokenizer.write_tokenizer_folder(folder)
    result = {"captions": len(texts), "unique": len(unique), "cpus": os.cpu_count(),
              "tokenize": bench_tokenizers(folder, unique, texts, args.repeats)}
  result["parquet_read"] = bench_parquet(texts, args.repeats, args.chunk)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
