"""memjax.labels against an independent restatement of docs/method.md section 7.

`_rule` below restates the rules with plain numpy loops, in the reference's
order (TV, MV, RV, N), strict `<`, and a missing image (None) skipped, never
replaced by a black image.
"""
import numpy as np
import pytest

from memjax.method import labels
from memjax.method import masks
from memjax.runtime.errors import InputError

N = 256


def _rule(gens, own, retrieved, templates, tv=2500.0, mv=2500.0, rv=3000.0):
  gens = [np.asarray(g, np.float64) for g in gens]
  tv_err = [[np.sum((t.image * t.mask[..., None] - g * t.mask[..., None]) ** 2) / np.mean(t.mask)
             for t in templates if t.mask.any()] for g in gens]
  mv_err = None if own is None else [np.sum((g - own) ** 2) for g in gens]
  rv_err = [[np.sum((g - q) ** 2) for q in retrieved if q is not None] for g in gens]
  tv_seeds = [s for s, e in enumerate(tv_err) if e and min(e) < tv]
  mv_seeds = [] if own is None else [s for s, e in enumerate(mv_err) if e < mv]
  rv_seeds = [s for s, e in enumerate(rv_err) if e and min(e) < rv]
  if tv_seeds:
    label, seeds = "TV", tv_seeds
  elif mv_seeds:
    label, seeds = "MV", mv_seeds
  elif rv_seeds:
    label, seeds = "RV", rv_seeds
  else:
    label, seeds = "N", []
  return {"label": label, "seeds": seeds, "mv": mv_err,
          "tv": [min(e) for e in tv_err] if tv_err[0] else None,
          "rv": [min(e) for e in rv_err] if rv_err[0] else None}


def _img(rng):
  return rng.integers(0, 256, (N, N, 3)).astype(np.float32) / 255


def _noisy(x, rng, sse):
  """x plus noise whose SSE to x is about `sse` (clipping aside)."""
  noise = rng.standard_normal(x.shape)
  return np.clip(x + noise * np.sqrt(sse / np.sum(noise ** 2)), 0, 1)


@pytest.fixture(scope="module")
def world():
  rng = np.random.default_rng(0)
  own, q1, q2, t = (_img(rng) for _ in range(4))
  mask = np.ones((N, N), bool)
  mask[64:160, 32:200] = False  # the varying part of the template
  template = masks.Template(t, mask, "tpl")
  changed = t.copy()  # the template with its varying part replaced
  changed[~mask] = rng.random((int((~mask).sum()), 3))
  empty = masks.Template(q1, np.zeros((N, N), bool), "empty")  # 0 / 0: skipped
  return {"rng": rng, "own": own, "q1": q1, "q2": q2, "templates": [empty, template],
          "changed": changed}


def _cases(w):
  rng, own, q1, q2 = w["rng"], w["own"], w["q1"], w["q2"]
  unrelated = lambda: _img(rng)
  black = np.zeros((N, N, 3), np.float32)
  return {
      "exact_copy": ([unrelated(), own], own, [q1, q2]),
      "template_changed_region": ([w["changed"], unrelated()], own, [q1]),
      "template_beats_mv": ([w["changed"], own], own, [q1]),
      "shifted_copy": ([np.roll(own, 4, axis=0), np.roll(q2, 4, axis=1)], own, [q1, q2]),
      "unrelated": ([unrelated(), unrelated()], own, [q1, q2]),
      "near_copy_mv": ([_noisy(own, rng, 2000), unrelated()], own, [q1]),
      "near_copy_over_mv": ([_noisy(own, rng, 3400), unrelated()], own, []),
      "retrieved_rv": ([unrelated(), _noisy(q2, rng, 3200)], own, [q1, None, q2]),
      "missing_own_black_gen": ([black, unrelated()], None, [q1]),
      "missing_retrieved_black_gen": ([black, black], own, [None, q1, None]),
      "missing_everything": ([unrelated()], None, [None]),
  }


@pytest.mark.parametrize("thresholds", [labels.Thresholds(), labels.Thresholds(3000, 2000, 2900)])
def test_labels_equal_independent_rule(world, thresholds):
  expected_defaults = {"exact_copy": "MV", "template_changed_region": "TV",
                       "template_beats_mv": "TV", "shifted_copy": "N", "unrelated": "N",
                       "near_copy_mv": "MV", "near_copy_over_mv": "N", "retrieved_rv": "RV",
                       "missing_own_black_gen": "N", "missing_retrieved_black_gen": "N",
                       "missing_everything": "N"}
  for name, (gens, own, retrieved) in _cases(world).items():
    ids = [f"r{i}" for i in range(len(retrieved))]
    got = labels.label_prompt(np.stack(gens), own, retrieved, world["templates"], own_id="own",
                              retrieved_ids=ids, seeds=[10 + s for s in range(len(gens))],
                              thresholds=thresholds)
    want = _rule(gens, own, retrieved, world["templates"], thresholds.tv, thresholds.mv,
                 thresholds.rv)
    assert got.label == want["label"], name
    if thresholds == labels.Thresholds():
      assert got.label == expected_defaults[name], name
    assert got.gen_seeds == [10 + s for s in want["seeds"]], name
    for key in ("mv", "tv", "rv"):
      per_seed = getattr(got, f"{key}_error_per_seed")
      if want[key] is None:
        assert per_seed is None and getattr(got, f"{key}_error") is None, (name, key)
      else:
        np.testing.assert_allclose(per_seed, want[key], rtol=1e-12, err_msg=name)
        assert getattr(got, f"{key}_error") == min(per_seed)
    assert got.own_status == ("missing" if own is None else "ok")
    assert got.missing_ids == [i for i, q in zip(ids, retrieved) if q is None], name
    assert got.complete == (own is not None and all(q is not None for q in retrieved))
    if got.label == "RV":
      assert got.matched_ids == ["r2"] and got.rv_matched_ids == ["r2"]
    if got.label == "MV":
      assert got.matched_ids == ["own"]
    if got.label == "TV":
      assert got.matched_ids == ["tpl"]
    assert got.n_templates == 1


def test_thresholds_are_strict_and_parameters(world):
  own = world["own"]
  gen = _noisy(own, world["rng"], 2000)[None]
  e = labels.label_prompt(gen, own).mv_error
  assert labels.label_prompt(gen, own, thresholds=labels.Thresholds(mv=e)).label == "N"
  assert labels.label_prompt(gen, own, thresholds=labels.Thresholds(mv=e + 1e-6)).label == "MV"
  row = labels.label_prompt(gen, own).as_row()
  assert row["overfit_type"] == "MV" and "label" not in row and row["gen_seeds"] == [0]


def test_missing_images_are_none(world):
  own, q1 = world["own"], world["q1"]
  gen = np.stack([q1, own])
  # The own image could not be read (None), the second retrieved one neither.
  got = labels.label_prompt(gen, None, [q1, None], retrieved_ids=["a", "b"])
  assert got.label == "RV" and got.own_status == "missing" and got.missing_ids == ["b"]
  assert got.rv_matched_ids == ["a"] and got.gen_seeds == [0] and got.mv_error is None
  assert got.mv_error_per_seed is None and got.n_retrieved == 1 and not got.complete
  assert got.rv_error == 0.0
  full = labels.label_prompt(gen, own, [q1], retrieved_ids=["a"])
  assert full.label == "MV" and full.own_status == "ok" and full.complete
  assert full.gen_seeds == [1] and full.mv_error == 0.0


def test_bad_shapes_are_input_errors(world):
  gen = world["own"][None]
  with pytest.raises(InputError, match="own training image x"):
    labels.label_prompt(gen, world["own"][:128], own_id="x")
  with pytest.raises(InputError, match="retrieved image 0"):
    labels.label_prompt(gen, None, [world["q1"][:, :100]])
  with pytest.raises(InputError, match="expected"):
    labels.label_prompt(world["own"], None)
