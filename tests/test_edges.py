"""memjax.edges: the edge-consistency score against scipy and ALGORITHMS.md's checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from PIL import Image

from memjax.method import edges


def _reference_score(img_group):
  """The reference's code (float32 images in [0, 255], 256 x 256 x 3), restated."""
  maps = []
  for img in img_group:
    im = img / 255.0
    mag = np.hypot(scipy.ndimage.sobel(im, axis=0), scipy.ndimage.sobel(im, axis=1))
    maps.append((mag.sum(axis=2) > 1.5).astype("float").reshape((256, 256, 1)))
  return float(((np.mean(np.concatenate(maps, axis=2), axis=2) > .5).astype("float32")).mean())


def _check_image(s):
  """ALGORITHMS.md section 3: gradient base image with a red rectangle shifted by s."""
  y, x = np.mgrid[0:256, 0:256].astype(np.float32)
  img = np.stack([x / 256 * 255, y / 256 * 255, np.full_like(x, 128)], axis=-1)
  img[64 + s:128 + s, 64:160] = [250, 20, 20]
  return img.astype(np.float32)


CHECKS = {
    "same_image_x4": ([_check_image(0)] * 4, 640 / 65536),
    "shifted": ([_check_image(s) for s in (0, 8, 16, 24)], 0.003540),
    "uniform_noise": ([np.random.default_rng(i).uniform(0, 255, (256, 256, 3)).astype(np.float32)
                       for i in range(4)], 1.0),
}


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_check_values_of_algorithms_md(name):
  imgs, expected = CHECKS[name]
  unit = [im / 255 for im in imgs]
  got = edges.edge_score_numpy(unit)
  got_jax = float(jax.jit(edges.edge_scores_jax)(jnp.asarray(np.stack(unit))[None])[0])
  assert round(got, 6) == round(expected, 6), (name, got)
  assert got == _reference_score(imgs) == got_jax
  if name == "same_image_x4":
    assert got == 640 / 65536


def test_sobel_copies_scipy_bit_for_bit_colour_axis_included():
  x = np.random.default_rng(0).uniform(0, 1, (2, 40, 56, 3)).astype(np.float32)
  for axis in (0, 1):
    ref = np.stack([scipy.ndimage.sobel(im, axis=axis) for im in x])
    got = np.asarray(jax.jit(lambda a, ax=axis: edges._sobel(a, ax - 3))(x))  # pylint: disable=protected-access
    np.testing.assert_array_equal(got, ref)
  # The colour axis is smoothed by [1, 2, 1] with reflection: c0 <- 3 c0 + c1.
  img = np.zeros((5, 5, 3), np.float32)
  img[3:, :, 0] = 1.0  # a horizontal step in the red channel only
  g = scipy.ndimage.sobel(img, axis=0)[2, 2]
  np.testing.assert_array_equal(g, [12.0, 4.0, 0.0])  # [1, 2, 1] x 4 along W
  np.testing.assert_array_equal(np.asarray(edges._sobel(jnp.asarray(img), 0))[2, 2], g)  # pylint: disable=protected-access
  mag = np.hypot(scipy.ndimage.sobel(img, axis=0), scipy.ndimage.sobel(img, axis=1))
  np.testing.assert_array_equal(np.asarray(jax.jit(edges._hypot)(  # pylint: disable=protected-access
      edges._sobel(jnp.asarray(img), 0), edges._sobel(jnp.asarray(img), 1))), mag)  # pylint: disable=protected-access


def _random_group(rng, n, smooth):
  """n uint8-derived float32 images in [0, 1]: noisy, or smooth blocks + noise."""
  if smooth:
    base = rng.integers(0, 256, (1, 9, 9, 3)).astype(np.float32)
    base = np.kron(base, np.ones((1, 29, 29, 1)))[:, :256, :256]
    u8 = np.clip(base + rng.normal(0, 4, (n, 256, 256, 3)), 0, 255).astype(np.uint8)
  else:
    u8 = rng.integers(0, 256, (n, 256, 256, 3)).astype(np.uint8)
  return u8.astype(np.float32) / 255


@pytest.mark.parametrize("n", [2, 3, 4])
def test_jax_equals_scipy_on_random_images(n):
  rng = np.random.default_rng(n)
  batch = np.stack([_random_group(rng, n, smooth=b % 2 == 0) for b in range(4)] +
                   [rng.uniform(0, 1, (n, 256, 256, 3)).astype(np.float32)])
  got = np.asarray(jax.jit(edges.edge_scores_jax)(jnp.asarray(batch)))
  ref = np.array([edges.edge_score_numpy(g) for g in batch])
  assert np.max(np.abs(got - ref)) <= 1e-6, (got, ref)
  maps = np.asarray(jax.jit(edges.edge_maps_jax)(jnp.asarray(batch)))
  ref_maps = np.stack([[edges.edge_map_numpy(im) for im in g] for g in batch])
  assert (maps != ref_maps).sum() == 0
  assert 0.0 < ref.min() and ref.max() <= 1.0
  if n == 4:
    assert all(edges.edge_score_numpy(g) == _reference_score(list(g * 255)) for g in batch[:2])


def test_resize_is_pil_lanczos_and_needs_rgb_uint8():
  rng = np.random.default_rng(0)
  u8 = rng.integers(0, 256, (64, 48, 3)).astype(np.uint8)
  ref = np.asarray(Image.fromarray(u8).resize((256, 256), Image.LANCZOS)).astype(np.float32) / 255
  got = edges.resize_for_edges(u8)
  assert got.dtype == np.float32 and got.shape == (256, 256, 3)
  np.testing.assert_array_equal(got, ref)
  np.testing.assert_array_equal(edges.resize_for_edges(Image.fromarray(u8)), ref)
  same = rng.integers(0, 256, (256, 256, 3)).astype(np.uint8)
  np.testing.assert_array_equal(edges.resize_for_edges(same), same.astype(np.float32) / 255)
  with pytest.raises(ValueError):
    edges.resize_for_edges(u8.astype(np.float32))
  with pytest.raises(ValueError):
    edges.resize_for_edges(Image.fromarray(u8).convert("L"))
  with pytest.raises(ValueError, match="at least 2"):
    edges.edge_score_numpy([got])
