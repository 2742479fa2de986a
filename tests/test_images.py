"""memjax.data.images: the one image reader (statuses, conversions, http cache),
the Lanczos resize the edge score and the labels see, the PNG writer."""
import functools
import http.server
import os
import threading

import numpy as np
import pytest
from PIL import Image

from memjax.data import images
from memjax.method import edges
from memjax.method import labels

N = labels.IMAGE_SIZE  # 256, as edges.EDGE_SIZE


def _lanczos(u8, size=N):
  return np.asarray(Image.fromarray(u8).resize((size, size), Image.LANCZOS), np.float32) / 255


def test_missing_and_unreadable_images_are_never_pixels(tmp_path):
  for ref in (None, "", "  "):
    got = images.read_image(ref)
    assert got.status == "missing" and got.pixels is None and not got.usable
  got = images.read_image(str(tmp_path / "nope.jpg"))
  assert got.pixels is None and got.status == "missing" and "nope.jpg" in got.detail
  (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
  got = images.read_image(str(tmp_path / "bad.jpg"))
  assert got.pixels is None and got.status == "unreadable" and "bad.jpg" in got.detail
  (tmp_path / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
  got = images.read_image(str(tmp_path / "cut.png"))
  assert got.status == "unreadable" and not got.usable
  # A PNG cut after its header: the size is known, the pixels are not.
  whole = tmp_path / "whole.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(whole)
  (tmp_path / "half.png").write_bytes(whole.read_bytes()[:200])
  assert images.read_image(str(tmp_path / "half.png")).status == "unreadable"
  assert images.read_image(str(whole)).status == "ok"


def test_rgba_is_squeezed_not_cropped_and_gray_repeated(tmp_path):
  # 2:1 RGBA image, left half red, right half blue: squeezed, not cropped
  a = np.zeros((100, 200, 4), np.uint8)
  a[:, :100] = (255, 0, 0, 128)
  a[:, 100:] = (0, 0, 255, 255)
  Image.fromarray(a, "RGBA").save(tmp_path / "wide.png")
  got = images.read_image(str(tmp_path / "wide.png"))
  assert got.usable and got.status == "ok_converted_from_RGBA"
  assert got.pixels.shape == (100, 200, 3) and got.pixels.dtype == np.uint8
  np.testing.assert_array_equal(got.pixels, a[..., :3])  # alpha dropped, not blended
  unit = images.to_unit(got.pixels, N)
  assert unit.shape == (N, N, 3) and unit.dtype == np.float32
  want = np.asarray(Image.open(tmp_path / "wide.png").convert("RGB").resize(
      (N, N), Image.LANCZOS), np.float32) / 255
  np.testing.assert_array_equal(unit, want)
  np.testing.assert_array_equal(unit[:, 0], [[1, 0, 0]] * N)
  np.testing.assert_array_equal(unit[:, -1], [[0, 0, 1]] * N)
  Image.fromarray(np.full((30, 40), 77, np.uint8), "L").save(tmp_path / "gray.jpg")
  got = images.read_image(str(tmp_path / "gray.jpg"))
  assert got.status == "ok_converted_from_L"
  unit = images.to_unit(got.pixels, N)
  assert unit.shape == (N, N, 3)
  np.testing.assert_array_equal(unit[..., 0], unit[..., 2])
  np.testing.assert_array_equal(unit[..., 0], unit[..., 1])


def test_other_modes_sizes_and_pil(tmp_path):
  # 16-bit gray: scaled to 8 bits (PIL's own conversion would clip to white).
  values = np.array([[0, 257, 32896, 65535]], np.uint16)
  Image.fromarray(values).save(tmp_path / "deep.png")
  got = images.read_image(str(tmp_path / "deep.png"))
  assert got.usable and got.status.startswith("ok_converted_from_I")
  np.testing.assert_array_equal(got.pixels[0, :, 0], [0, 1, 128, 255])
  np.testing.assert_array_equal(got.pixels[..., 0], got.pixels[..., 2])
  # Palette images: the palette's colours.
  pal = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
  pal.putpalette([10, 20, 30, 200, 100, 0] + [0] * 762)
  pal.save(tmp_path / "pal.png")
  got = images.read_image(str(tmp_path / "pal.png"))
  assert got.status == "ok_converted_from_P"
  np.testing.assert_array_equal(got.pixels[0], [[10, 20, 30], [200, 100, 0]])
  # Float images are not guessed at.
  Image.fromarray(np.ones((4, 4), np.float32)).save(tmp_path / "float.tif")
  got = images.read_image(str(tmp_path / "float.tif"))
  assert got.status == "unsupported_mode_F" and not got.usable
  # The pixel limit is checked from the header.
  rgb = np.random.default_rng(1).integers(0, 256, (30, 50, 3), np.uint8)
  Image.fromarray(rgb).save(tmp_path / "rgb.png")
  got = images.read_image(str(tmp_path / "rgb.png"), max_pixels=1000)
  assert got.status == "too_large" and "50 x 30" in got.detail and got.pixels is None
  got = images.read_image(str(tmp_path / "rgb.png"), max_pixels=1500)
  assert got.status == "ok" and got.ref == str(tmp_path / "rgb.png")
  np.testing.assert_array_equal(got.pixels, rgb)
  np.testing.assert_array_equal(np.asarray(got.pil()), rgb)
  assert got.pil().mode == "RGB"


def test_local_refs_file_urls_and_base_dir(tmp_path):
  rng = np.random.default_rng(5)
  array = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
  Image.fromarray(array).save(tmp_path / "ok.png")
  (tmp_path / "bad.png").write_bytes(b"not an image")
  got = images.read_image("ok.png", base_dir=str(tmp_path))
  assert got.status == "ok" and got.ref == "ok.png"
  pixels = images.to_unit(got.pixels, 256)
  assert pixels.shape == (256, 256, 3)
  np.testing.assert_array_equal(pixels, _lanczos(array))
  np.testing.assert_array_equal(images.to_unit(got.pil(), 256), pixels)
  assert images.read_image("file://" + str(tmp_path / "ok.png")).status == "ok"
  # An absolute path ignores base_dir; a relative one needs it.
  assert images.read_image(str(tmp_path / "ok.png"), base_dir="/nowhere").status == "ok"
  assert images.read_image("ok.png", base_dir=str(tmp_path / "sub")).status == "missing"
  assert images.read_image(str(tmp_path / "gone.png")).status == "missing"
  assert images.read_image(None).status == "missing"
  assert images.read_image(str(tmp_path / "bad.png")).status == "unreadable"


def test_image_ref():
  assert images.image_ref({"image_path": " a.png ", "url": "http://x"}) == "a.png"
  assert images.image_ref({"image_path": "", "url": "http://x/y.jpg"}) == "http://x/y.jpg"
  assert images.image_ref({"image_path": None, "url": None}) is None
  assert images.image_ref({"caption": "no image"}) is None
  assert images.image_ref(None) is None


def test_resize_is_pil_lanczos_and_needs_rgb_uint8():
  rng = np.random.default_rng(0)
  u8 = rng.integers(0, 256, (64, 48, 3)).astype(np.uint8)
  ref = _lanczos(u8, edges.EDGE_SIZE)
  got = images.to_unit(u8, edges.EDGE_SIZE)
  assert got.dtype == np.float32 and got.shape == (256, 256, 3)
  np.testing.assert_array_equal(got, ref)
  np.testing.assert_array_equal(images.to_unit(Image.fromarray(u8), 256), ref)
  as_u8 = images.resize_uint8(u8, 256)
  assert as_u8.dtype == np.uint8 and as_u8.shape == (256, 256, 3)
  np.testing.assert_array_equal(as_u8.astype(np.float32) / 255, ref)
  np.testing.assert_array_equal(images.resize_uint8(u8, 32),
                                np.asarray(Image.fromarray(u8).resize((32, 32), Image.LANCZOS)))
  same = rng.integers(0, 256, (256, 256, 3)).astype(np.uint8)
  np.testing.assert_array_equal(images.to_unit(same, 256), same.astype(np.float32) / 255)
  with pytest.raises(ValueError, match="uint8"):
    images.to_unit(u8.astype(np.float32), 256)
  with pytest.raises(ValueError, match="uint8"):
    images.resize_uint8(u8[..., :2], 256)
  with pytest.raises(ValueError, match="mode L"):
    images.to_unit(Image.fromarray(u8).convert("L"), 256)


def test_write_png_round_trips(tmp_path):
  rgb = np.random.default_rng(2).integers(0, 256, (20, 12, 3), np.uint8)
  path = str(tmp_path / "a" / "b.png")
  images.write_png(path, rgb)
  assert os.listdir(tmp_path / "a") == ["b.png"]
  got = images.read_image(path)
  assert got.status == "ok"
  np.testing.assert_array_equal(got.pixels, rgb)


def test_http_images_are_cached_and_dead_links_remembered(tmp_path):
  served = tmp_path / "served"
  served.mkdir()
  Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(served / "a.png")
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
  handler.log_message = lambda *a: None
  server = http.server.HTTPServer(("127.0.0.1", 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  base = f"http://127.0.0.1:{server.server_address[1]}"
  cache = str(tmp_path / "cache")
  try:
    got = images.read_image(base + "/a.png", cache_dir=cache)
    assert got.status == "ok" and tuple(got.pixels[0, 0]) == (200, 200, 200)
    got = images.read_image(base + "/gone.png", cache_dir=cache)
    assert got.pixels is None and got.status == "missing" and "404" in got.detail
  finally:
    server.shutdown()
    server.server_close()
  assert len(os.listdir(cache)) == 2  # the image and the dead link's note
  # Served from the cache now that the server is gone; the dead link stays dead.
  assert images.read_image(base + "/a.png", cache_dir=cache).status == "ok"
  assert "404" in images.read_image(base + "/gone.png", cache_dir=cache).detail
  # Without a cache, the gone server is a dead link, not a crash.
  got = images.read_image(base + "/a.png")
  assert got.status == "missing" and got.detail.startswith(base + "/a.png: ")
