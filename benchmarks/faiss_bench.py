"""Which FAISS index for the ground-truth retrieval: build time, memory, recall, speed.

    nice python benchmarks/faiss_bench.py --out=/tmp/faiss_bench.json

memjax's verify stage finds the nearest training images of each generated image
by inner product of L2-normalised CLIP ViT-L/14 embeddings (768-d) in the index
that `memjax.index --index_factory=...` builds (`memjax.data.retrieval`). Per
database size and factory string (inner-product metric) this measures: build
time (train + add), bytes per vector (serialized index size / n), recall@k
against exact search (`IndexFlatIP`, same vectors), the fraction of queries whose
true top-1 is in the returned top k (what the attack needs), and the time per
query with one thread and with `--threads`, over a sweep of nprobe / efSearch.

Data (synthetic, seeded, reproducible). Isotropic Gaussian vectors are the worst
case for ANN search and unlike CLIP embeddings; database vectors here come from a
clustered mixture in a low-rank-ish subspace:

    x = normalise(0.8 m + c_j + 0.5 U^T (s * z) + 0.4 e / sqrt(768))

m a fixed unit "mean" direction (CLIP embeddings share one); U a random
orthonormal basis of a 256-d subspace; s_i proportional to i^-0.4 (i = 1..256,
unit norm), the spectrum of the centres and of the within-cluster spread; c_j =
U^T (s * z_j) one of 10,000 centres drawn with log-normal(0, 1) weights; z, z_j ~
N(0, I_256), e ~ N(0, I_768). Then 5 % of each 100k-row block are replaced by
jittered copies (cosine 0.96-0.995) of 1 % of its rows: groups of duplicates, as
memorised images are duplicated in LAION. Stored as float16 (as LAION's
embeddings), cast to float32 for FAISS and for the ground truth. Blocks are
seeded by (seed, block): a smaller database is a prefix of a larger one.
Queries: half near-duplicates of database rows (moved in a random direction to
cosine U[0.85, 0.98] with the row: a generated copy of a training image), half
fresh samples of the mixture (a generation that copies nothing).

IVF indices of one size share the coarse k-means (spherical, 10 iterations, as
FAISS trains an IVF) and, with a flat coarse quantizer, the assignment of the
database to the lists; both are timed once and their time is added to the build
time of each index that uses them (`shared_s`). OPQ indices train their own. The
training sample is min(n, max(40 nlist, 65536)) rows drawn uniformly.

Factories: `;`-separated `FACTORY[@LO:HI]` (the sizes it runs at); `{nlist}` is
the multiple of 256 >= --nlist_factor * sqrt(n). Search settings: nprobe (with
quantizer_efSearch = 2 nprobe for an HNSW coarse quantizer, and FAISS's default
16 at nprobe 64), efSearch for HNSW, and for compressed codes `rerank=100`: the
top 100 re-scored exactly with the stored vectors (in RAM here; memjax does not
do this today). IVF-PQ is trained without FAISS's polysemous training, which
index_factory turns on: it reorders codebooks for Hamming filtering, which no
search here uses (same recall and speed), and cost 99 s against 21 s without it
for IVF1280,PQ64 on this machine; `--polysemous` keeps it.
"""
import argparse
import datetime
import gc
import json
import math
import os
import platform
import tempfile
import time

# OpenMP threads that spin while they wait slow FAISS down several-fold when other
# processes share the cores (PQ training: 14 s spinning, 4 s passive, on a loaded
# 2-core machine). Set before FAISS loads its OpenMP runtime; the caller's wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # pylint: disable=g-import-not-at-top,g-bad-import-order
from faiss.contrib import ivf_tools  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

BLOCK = 100_000
DEFAULT_FACTORIES = ";".join([
    "Flat@:1e6", "HNSW32,Flat@:1e5", "IVF{nlist},Flat@:1e6", "IVF{nlist},SQ8@:1e6",
    "IVF{nlist},PQ64@:1e6", "IVF{nlist},PQ96@1e6:1e6", "OPQ64_256,IVF{nlist},PQ64@1e6:1e6",
    "IVF{nlist}_HNSW32,PQ64"])
NPROBES = (1, 4, 16, 64, 256)
EF_SEARCHES = (16, 32, 64, 128, 256)
RERANK = 100  # candidates re-ranked exactly in the rerank rows of compressed indices


class Mixture:
  """The clustered, low-rank-ish generator of the module docstring."""

  def __init__(self, dim: int, seed: int, clusters: int = 10_000, rank: int = 256):
    rng = np.random.default_rng([seed, 0])
    self.dim, self.seed = dim, seed
    self.basis = np.linalg.qr(rng.standard_normal((dim, rank)))[0].T.astype(np.float32)
    spec = np.arange(1, rank + 1, dtype=np.float32) ** -0.4
    self.spec = spec / np.sqrt((spec ** 2).sum())
    mean = rng.standard_normal(dim).astype(np.float32)
    self.mean = 0.8 * mean / np.linalg.norm(mean)
    self.centres = self._low_rank(rng, clusters)
    weights = rng.lognormal(0.0, 1.0, clusters)
    self.weights = weights / weights.sum()

  def _low_rank(self, rng, n):
    return (rng.standard_normal((n, len(self.spec)), np.float32) * self.spec) @ self.basis

  def sample(self, rng, n) -> np.ndarray:
    x = self.mean + self.centres[rng.choice(len(self.weights), n, p=self.weights)]
    x += 0.5 * self._low_rank(rng, n)
    x += (0.4 / math.sqrt(self.dim)) * rng.standard_normal((n, self.dim), np.float32)
    return _unit(x)

  def block(self, b: int) -> np.ndarray:
    """Rows [b * BLOCK, (b + 1) * BLOCK), float16, with duplicate groups."""
    rng = np.random.default_rng([self.seed, 1, b])
    x = self.sample(rng, BLOCK)
    popular = rng.choice(BLOCK, BLOCK // 100, replace=False)
    copies = rng.choice(np.setdiff1d(np.arange(BLOCK), popular), BLOCK // 20, replace=False)
    x[copies] = perturb(rng, x[rng.choice(popular, len(copies))], 0.96, 0.995)
    return x.astype(np.float16)


def _unit(x):
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def perturb(rng, x, lo, hi):
  """x moved in a random direction orthogonal to it, to cosine U[lo, hi] with x."""
  e = rng.standard_normal(x.shape, np.float32)
  e -= (e * x).sum(1, keepdims=True) * x
  cos = rng.uniform(lo, hi, (len(x), 1)).astype(np.float32)
  return _unit(x + np.sqrt(1 / cos ** 2 - 1) * _unit(e))


class Store:
  """The database rows generated so far (float16), grown block by block."""

  def __init__(self, mix: Mixture):
    self.mix, self.blocks = mix, []

  def grow(self, n):
    while len(self.blocks) * BLOCK < n:
      self.blocks.append(self.mix.block(len(self.blocks)))

  def chunks(self, n, rows=BLOCK):
    """float32 arrays covering rows [0, n), with their start row."""
    for start in range(0, n, rows):
      b, stop = start // BLOCK, min(n, start + rows)
      yield start, self.blocks[b][start - b * BLOCK:stop - b * BLOCK].astype(np.float32)

  def rows(self, ids):
    ids = np.asarray(ids).reshape(-1)
    out = np.empty((len(ids), self.mix.dim), np.float32)
    for b in np.unique(ids // BLOCK):
      pick = ids // BLOCK == b
      out[pick] = self.blocks[b][ids[pick] - b * BLOCK]
    return out


def ground_truth(store, n, queries, k):
  """Exact top-k (inner product) of the queries among rows [0, n)."""
  best_s = np.full((len(queries), k), -np.inf, np.float32)
  best_i = np.full((len(queries), k), -1, np.int64)
  for start, x in store.chunks(n):
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    s, i = flat.search(queries, k)
    s_all, i_all = np.concatenate([best_s, s], 1), np.concatenate([best_i, i + start], 1)
    order = np.argsort(-s_all, axis=1, kind="stable")[:, :k]
    best_s = np.take_along_axis(s_all, order, 1)
    best_i = np.take_along_axis(i_all, order, 1)
  return best_s, best_i


def nlist_for(n, factor):
  return 256 * math.ceil(factor * math.sqrt(n) / 256)


def parse_factories(spec):
  out = []
  for item in filter(None, (s.strip() for s in spec.split(";"))):
    factory, _, rng = item.partition("@")
    lo, _, hi = rng.partition(":")
    out.append((factory, float(lo) if lo else 0.0, float(hi) if hi else math.inf))
  return out




class Shared:
  """Per-size coarse centroids and list assignment, computed once, timed."""

  def __init__(self, store, n, nlist, train):
    self.store, self.n, self.nlist, self.train = store, n, nlist, train
    self.centroids = self.assign = None
    self.kmeans_s = self.assign_s = 0.0

  def get_centroids(self):
    if self.centroids is None:
      t = time.perf_counter()
      km = faiss.Kmeans(self.train.shape[1], self.nlist, niter=10, spherical=True, seed=1234,
                        max_points_per_centroid=256)
      km.train(self.train)
      self.centroids, self.kmeans_s = km.centroids, time.perf_counter() - t
    return self.centroids

  def get_assign(self):
    if self.assign is None:
      quantizer = faiss.IndexFlatIP(self.train.shape[1])
      quantizer.add(self.get_centroids())
      t, parts = time.perf_counter(), []
      for _, x in self.store.chunks(self.n):
        parts.append(quantizer.search(x, 1)[1][:, 0])
      self.assign, self.assign_s = np.concatenate(parts), time.perf_counter() - t
    return self.assign


def build(factory, dim, store, n, shared, args):
  """Trains and fills an index; returns it and its timings."""
  index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
  any_ivf, info = faiss.try_extract_index_ivf(index), {"shared_s": 0.0}
  ivf = any_ivf if isinstance(faiss.downcast_index(index), faiss.IndexIVF) else None  # no OPQ
  if any_ivf is not None and hasattr(faiss.downcast_index(any_ivf), "do_polysemous_training"):
    faiss.downcast_index(any_ivf).do_polysemous_training = args.polysemous
  quantizer = faiss.downcast_index(any_ivf.quantizer) if any_ivf is not None else None
  if args.add_quantizer_ef and isinstance(quantizer, faiss.IndexHNSW):
    quantizer.hnsw.efSearch = args.add_quantizer_ef  # the sweep sets it again to search
  if ivf is not None:
    ivf.quantizer.add(shared.get_centroids())  # FAISS then skips the coarse k-means
    info["shared_s"] += shared.kmeans_s
  preassigned = ivf is not None and isinstance(quantizer, faiss.IndexFlat)
  if preassigned:
    assign = shared.get_assign()
    info["shared_s"] += shared.assign_s
  t = time.perf_counter()
  if not index.is_trained:
    index.train(shared.train)
  info["train_s"] = time.perf_counter() - t
  t = time.perf_counter()
  for start, x in store.chunks(n):
    if preassigned:
      ivf_tools.add_preassigned(ivf, x, assign[start:start + len(x)])
    else:
      index.add(x)
  info["add_s"] = time.perf_counter() - t
  info["build_s"] = info["shared_s"] + info["train_s"] + info["add_s"]
  with tempfile.NamedTemporaryFile(suffix=".index") as f:
    faiss.write_index(index, f.name)  # the bytes of faiss.serialize_index, without a copy
    info["bytes"] = os.path.getsize(f.name)
  info["bytes_per_vector"] = info["bytes"] / n
  return index, info


def sweep(index):
  """Search-parameter strings for faiss.ParameterSpace, cheapest first."""
  ivf = faiss.try_extract_index_ivf(index)
  if ivf is not None:
    params = [f"nprobe={p}" for p in NPROBES if p <= ivf.nlist]
    if isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW):
      params = [f"{p},quantizer_efSearch={max(16, 2 * int(p[7:]))}" for p in params]
      params.append("nprobe=64,quantizer_efSearch=16")
    if "Flat" not in type(faiss.downcast_index(ivf)).__name__:  # compressed codes
      params += [f"{p},rerank={RERANK}" for p in params[:len(NPROBES)]
                 if p.split(",")[0] in ("nprobe=16", "nprobe=64")]
    return params
  if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
    return [f"efSearch={e}" for e in EF_SEARCHES]
  return [""]


def _search(index, store, queries, k, rerank):
  """Top k; with rerank, the top `rerank` re-scored exactly with the stored vectors."""
  if not rerank:
    return index.search(queries, k)[1]
  cand = index.search(queries, rerank)[1]
  vecs = store.rows(np.maximum(cand, 0)).reshape(len(queries), rerank, -1)
  sims = np.where(cand >= 0, np.einsum("qd,qcd->qc", queries, vecs), -np.inf)
  return np.take_along_axis(cand, np.argsort(-sims, axis=1)[:, :k], 1)


def timed_search(index, store, queries, k, rerank, threads, budget_s=2.0):
  """(ids, seconds per query): best of up to 3 runs within budget_s."""
  faiss.omp_set_num_threads(threads)
  best, ids, spent = math.inf, None, 0.0
  for _ in range(3):
    t = time.perf_counter()
    ids = _search(index, store, queries, k, rerank)
    dt = time.perf_counter() - t
    best, spent = min(best, dt), spent + dt
    if spent > budget_s:
      break
  return ids, best / len(queries)


def measure(index, store, params, queries, gt, n_dup, k, threads, st_queries):
  """Recall and time per query of one search setting."""
  faiss_params, _, rerank = params.partition(",rerank=")
  if faiss_params:
    faiss.ParameterSpace().set_index_parameters(index, faiss_params)
  rerank = int(rerank) if rerank else 0
  ids, t_all = timed_search(index, store, queries, k, rerank, threads)
  step = max(1, len(queries) // st_queries)  # both halves, dup and fresh
  _, t_one = timed_search(index, store, np.ascontiguousarray(queries[::step][:st_queries]), k,
                          rerank, 1)
  faiss.omp_set_num_threads(threads)
  hits = np.array([len(set(a) & set(b)) for a, b in zip(ids, gt)]) / k
  top1 = np.array([g[0] in set(a) for a, g in zip(ids, gt)])
  return {"params": params or "-", "recall_at_k": float(hits.mean()),
          "top1_in_k_dup": float(top1[:n_dup].mean()),
          "top1_in_k_fresh": float(top1[n_dup:].mean()),
          "ms_per_query_1t": 1e3 * t_one, "ms_per_query_nt": 1e3 * t_all}


def table(rows, k, threads):
  head = (f"| n | factory | search | build (s) | B/vec | R@{k} | top1 in {k} (dup) | "
          f"top1 in {k} (fresh) | ms/q 1 thr | ms/q {threads} thr |")
  lines, last = [head, "|" + "---|" * 10], None
  for r in rows:
    first = (r["n"], r["factory"]) != last
    last = (r["n"], r["factory"])
    lines.append(
        f"| {r['n']:.0e} | `{r['factory']}` | {r['params']} | "
        f"{r['build_s']:.1f} | {r['bytes_per_vector']:.1f} | " if first else
        f"| | | {r['params']} | | | ")
    lines[-1] += (f"{r['recall_at_k']:.3f} | {r['top1_in_k_dup']:.3f} | "
                  f"{r['top1_in_k_fresh']:.3f} | {r['ms_per_query_1t']:.3f} | "
                  f"{r['ms_per_query_nt']:.3f} |")
  return "\n".join(lines).replace("e+0", "e")


def data_stats(store, n, gt_s, n_dup):
  x = store.rows(np.arange(min(n, 2000)))
  return {"mean_pairwise_cos": float((x[:len(x) // 2] @ x[len(x) // 2:].T).mean()),
          "top1_sim_dup_median": float(np.median(gt_s[:n_dup, 0])),
          "top1_sim_fresh_median": float(np.median(gt_s[n_dup:, 0])),
          "top10_sim_fresh_median": float(np.median(gt_s[n_dup:, -1]))}


def run(args):
  threads = args.threads or os.cpu_count()
  faiss.omp_set_num_threads(threads)
  mix = Mixture(args.dim, args.seed)
  store = Store(mix)
  n_dup = args.queries // 2
  fresh = mix.sample(np.random.default_rng([args.seed, 2]), args.queries - n_dup)
  factories = parse_factories(args.factories)
  out = {"meta": {"args": vars(args), "threads": threads, "faiss": faiss.__version__,
                  "numpy": np.__version__, "machine": f"{platform.machine()} {os.cpu_count()} "
                  f"cores, {platform.processor() or platform.platform()}",
                  "date": datetime.date.today().isoformat(), "sizes": {}}, "rows": []}
  t_run = time.perf_counter()
  for n in sorted(int(float(s)) for s in args.sizes.split(",")):
    t = time.perf_counter()
    store.grow(n)
    gen_s = time.perf_counter() - t
    rng = np.random.default_rng([args.seed, 3, n])
    dup = perturb(rng, store.rows(rng.choice(n, n_dup, replace=False)), 0.85, 0.98)
    queries = np.ascontiguousarray(np.concatenate([dup, fresh]))
    t = time.perf_counter()
    gt_s, gt = ground_truth(store, n, queries, args.k)
    gt_time = time.perf_counter() - t
    nlist = nlist_for(n, args.nlist_factor)
    n_train = min(n, max(40 * nlist, 65536))
    train_ids = np.sort(rng.choice(n, n_train, replace=False))
    shared = Shared(store, n, nlist, store.rows(train_ids))
    out["meta"]["sizes"][n] = {"nlist": nlist, "train": n_train, "generate_s": gen_s,
                               "ground_truth_s": gt_time, **data_stats(store, n, gt_s, n_dup)}
    print(f"n={n}: nlist={nlist}, train={n_train}, {out['meta']['sizes'][n]}", flush=True)
    for template, lo, hi in factories:
      if not lo <= n <= hi:
        continue
      factory = template.format(nlist=nlist)
      index, info = build(factory, args.dim, store, n, shared, args)
      print(f"  {factory}: {info}", flush=True)
      for params in sweep(index):
        row = {"n": n, "factory": factory, "nlist": nlist if "IVF" in factory else None,
               "train_vectors": n_train, **info,
               **measure(index, store, params, queries, gt, n_dup, args.k, threads,
                         args.st_queries)}
        out["rows"].append(row)
        print("   ", {k: row[k] for k in ("params", "recall_at_k", "top1_in_k_dup",
                                          "top1_in_k_fresh", "ms_per_query_1t",
                                          "ms_per_query_nt")}, flush=True)
      del index
      gc.collect()
      if args.out:
        with open(args.out, "w") as f:
          json.dump(out, f, indent=1)
    out["meta"]["sizes"][n].update(kmeans_s=shared.kmeans_s, assign_s=shared.assign_s)
    del shared
    gc.collect()
  out["meta"]["wall_s"] = time.perf_counter() - t_run
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)
  print(table(out["rows"], args.k, threads))
  print(f"wall {out['meta']['wall_s']:.0f} s")
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="1e5,1e6", help="Database sizes (comma-separated).")
  p.add_argument("--dim", type=int, default=768)
  p.add_argument("--queries", type=int, default=1000, help="Half near-duplicates, half fresh.")
  p.add_argument("--k", type=int, default=10)
  p.add_argument("--factories", default=DEFAULT_FACTORIES,
                 help="';'-separated FACTORY[@LO:HI]; {nlist} is filled in per size.")
  p.add_argument("--nlist_factor", type=float, default=4.0,
                 help="nlist = the multiple of 256 >= this x sqrt(n).")
  p.add_argument("--threads", type=int, default=0, help="'All threads' (default: all cores).")
  p.add_argument("--st_queries", type=int, default=200,
                 help="Queries timed with one thread (the first ones).")
  p.add_argument("--polysemous", action="store_true",
                 help="Keep FAISS's polysemous training of IVF-PQ codes (index_factory's "
                 "default, and memjax's; ~80 s per index here, results unchanged).")
  p.add_argument("--add_quantizer_ef", type=int, default=0,
                 help="efSearch of an HNSW coarse quantizer while adding (default: "
                 "FAISS's 16, as memjax's index stage).")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="JSON file for the figures.")
  run(p.parse_args())


if __name__ == "__main__":
  main()
