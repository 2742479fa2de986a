"""memjax.method.edges: the edge-consistency score against the reference's code
and the checks of docs/method.md section 3. (Resizing: tests/test_images.py.)"""
import numpy as np
import pytest
import scipy.ndimage

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
  """docs/method.md section 3: gradient base image with a red rectangle shifted by s."""
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
def test_check_values_of_docs_method_md(name):
  imgs, expected = CHECKS[name]
  unit = [im / 255 for im in imgs]
  got = edges.edge_score_numpy(unit)
  assert round(got, 6) == round(expected, 6), (name, got)
  assert got == _reference_score(imgs)
  assert got == edges.edge_score_numpy(np.stack(unit))  # a list or an [N, H, W, 3] array
  if name == "same_image_x4":
    assert got == 640 / 65536


def test_the_colour_axis_is_smoothed_too():
  """scipy's Sobel on [H, W, 3] smooths by [1, 2, 1] along the colour axis, with
  reflection: c0 <- 3 c0 + c1; edge_map_numpy keeps that mixing."""
  img = np.zeros((5, 5, 3), np.float32)
  img[3:, :, 0] = 1.0  # a horizontal step in the red channel only
  g = scipy.ndimage.sobel(img, axis=0)[2, 2]
  np.testing.assert_array_equal(g, [12.0, 4.0, 0.0])  # [1, 2, 1] x 4 along W
  # Per-pixel magnitude summed over channels: 12 + 4 = 16 on the step rows.
  np.testing.assert_array_equal(edges.edge_map_numpy(img, threshold=15.9)[2], [True] * 5)
  np.testing.assert_array_equal(edges.edge_map_numpy(img, threshold=16.0)[2], [False] * 5)
  # A per-channel Sobel would give 4 in red only: not what is computed.
  per_channel = np.stack([scipy.ndimage.sobel(img[..., c], axis=0) for c in range(3)], -1)
  np.testing.assert_array_equal(per_channel[2, 2], [4.0, 0.0, 0.0])
  assert edges.edge_map_numpy(img, threshold=4.1)[2].all()


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
def test_scores_and_maps_equal_the_reference_on_random_images(n):
  rng = np.random.default_rng(n)
  batch = np.stack([_random_group(rng, n, smooth=b % 2 == 0) for b in range(4)] +
                   [rng.uniform(0, 1, (n, 256, 256, 3)).astype(np.float32)])
  got = np.array([edges.edge_score_numpy(g) for g in batch])
  ref = np.array([_reference_score(list(g * 255)) for g in batch[:4]])
  np.testing.assert_array_equal(got[:4], ref)
  for g in batch[:2]:
    for im in g:
      mag = np.hypot(scipy.ndimage.sobel(im, axis=0), scipy.ndimage.sobel(im, axis=1))
      np.testing.assert_array_equal(edges.edge_map_numpy(im), mag.sum(axis=2) > 1.5)
  assert 0.0 < got.min() and got.max() <= 1.0
  assert got[0] != got[1]  # smooth and noisy groups differ


def test_needs_two_images():
  img = np.zeros((256, 256, 3), np.float32)
  with pytest.raises(ValueError, match="at least 2"):
    edges.edge_score_numpy([img])
  assert edges.edge_score_numpy([img, img]) == 0.0
