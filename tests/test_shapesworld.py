"""Tests for the ShapesWorld source (data_pipelines.shapesworld) and its caption grammar."""

import time

import numpy as np
import pytest

from data_pipelines import shapesworld as sw

HOLDOUT = (("red", "triangle", "left"), ("blue", "circle", "up"), ("green", "square", "static"))
RICH = sw.ShapesWorldConfig(camera_pan_prob=0.5, max_objects=2)


@pytest.fixture(scope="module")
def rich_examples():
  source = sw.ShapesWorld(RICH)
  return [source.example(i) for i in range(150)]


def test_same_seed_and_index_give_the_same_clip_in_any_order():
  a, b = sw.ShapesWorld(RICH), sw.ShapesWorld(RICH)
  order = [7, 3, 11, 3, 0]
  first = {i: a[i] for i in order}
  for i in reversed(order):
    item = b[i]
    np.testing.assert_array_equal(item["video"], first[i]["video"])
    assert item["caption"] == first[i]["caption"]
    assert item["index"] == i and isinstance(item["index"], np.int64)
  reseeded = sw.ShapesWorld(sw.ShapesWorldConfig(seed=1, camera_pan_prob=0.5))
  differs = [not np.array_equal(reseeded[i]["video"], first[i]["video"])
             or reseeded[i]["caption"] != first[i]["caption"] for i in (0, 3, 7, 11)]
  assert all(differs)
  assert a[0]["caption"] != a[3]["caption"] or not np.array_equal(a[0]["video"], a[3]["video"])


def test_getitem_has_only_batchable_fields(rich_examples):
  item = sw.ShapesWorld(RICH)[5]
  assert set(item) == {"video", "caption", "index"}
  assert item["video"].dtype == np.uint8 and item["video"].ndim == 4
  assert item["video"].shape[-1] == 3
  assert isinstance(item["caption"], str)
  with pytest.raises(IndexError, match="out of range"):
    sw.ShapesWorld(sw.ShapesWorldConfig(num_examples=10))[10]
  assert len(sw.ShapesWorld(sw.ShapesWorldConfig(num_examples=10))) == 10


@pytest.mark.parametrize("split", ["train", "holdout"])
def test_shape_of_agrees_with_rendered_video(split):
  source = sw.ShapesWorld(sw.ShapesWorldConfig(holdout=HOLDOUT, max_objects=2), split=split)
  for i in range(60):
    assert source.shape_of(i) == source[i]["video"].shape[:3], i


def test_every_native_size_and_length_appears():
  config = sw.ShapesWorldConfig()
  source = sw.ShapesWorld(config)
  shapes = [source.shape_of(i) for i in range(400)]
  assert {(h, w) for _, h, w in shapes} == set(config.sizes)
  assert {t for t, _, _ in shapes} == set(config.lengths)
  aspects = {round(w / h, 3) for h, w in config.sizes}
  assert len(aspects) >= 4
  assert any(a > 1 for a in aspects) and any(a < 1 for a in aspects) and 1.0 in aspects
  assert 1 in config.lengths


def test_captions_parse_back_to_the_ground_truth(rich_examples):
  seen = set()
  for ex in rich_examples:
    caption = sw.parse_caption(ex.caption)
    frames = ex.video.shape[0]
    assert caption.camera == ex.camera
    assert len(caption.objects) == len(ex.objects)
    for said, truth in zip(caption.objects, ex.objects):
      assert (said.colour, said.shape, said.size, said.motion) == (
          truth.colour, truth.shape, truth.size, truth.motion)
    assert sw.format_caption(caption, image=frames == 1) == ex.caption
    if frames == 1:
      assert "moving" not in ex.caption and "still" not in ex.caption and ex.camera == "static"
    assert len({o.colour for o in ex.objects}) == len(ex.objects)
    seen.add((len(ex.objects), ex.camera != "static", frames == 1))
  # Coverage: one and two objects, with and without pans, images.
  assert {(1, False, False), (2, False, False), (1, True, False), (2, True, False)} <= seen
  assert any(image for _, _, image in seen)


LONG = sw.ShapesWorldConfig(sizes=((24, 48), (48, 24)), lengths=(33, 65), camera_pan_prob=0.5)


@pytest.mark.parametrize("long_clips", [False, True])
def test_ground_truth_motion_matches_the_caption_and_stays_in_frame(rich_examples, long_clips):
  """On screen, objects move as captioned, at constant velocity, without bouncing along their main
  axis in the first half of the clip (long clips are slowed down for that), and stay in frame."""
  if long_clips:
    rich_examples = [sw.ShapesWorld(LONG).example(i) for i in range(40)]
  for ex in rich_examples:
    frames, height, width, _ = ex.video.shape
    for o in ex.objects:
      xy = o.centres_t2
      half = o.size_px / 2
      assert np.all(xy[:, 0] >= half - 1e-3) and np.all(xy[:, 0] <= width - half + 1e-3)
      assert np.all(xy[:, 1] >= half - 1e-3) and np.all(xy[:, 1] <= height - half + 1e-3)
      if frames == 1:
        continue
      # On screen: object motion minus camera motion; the camera is slower than any object.
      expected = o.motion if o.motion != "static" else sw.OPPOSITE[ex.camera]
      step = xy[(frames - 1) // 2] - xy[0]
      if expected == "static":
        np.testing.assert_allclose(step, 0.0, atol=1e-4)
        continue
      axis = 0 if expected in ("left", "right") else 1
      sign = 1.0 if expected in ("right", "down") else -1.0
      assert sign * step[axis] > abs(step[1 - axis]) - 1e-4, (ex.caption, step)
      # Constant velocity along the main axis (the other axis may bounce on a camera drift).
      velocity = np.diff(xy[: (frames - 1) // 2 + 1, axis])
      np.testing.assert_allclose(velocity, velocity[0], atol=1e-3)


def test_long_clips_bounce_off_the_walls():
  config = sw.ShapesWorldConfig(sizes=((32, 32),), lengths=(65,), max_objects=1)
  source = sw.ShapesWorld(config)
  reversals = 0
  for i in range(12):
    ex = source.example(i)
    o = ex.objects[0]
    if o.motion == "static":
      continue
    axis = 0 if o.motion in ("left", "right") else 1
    steps = np.diff(o.centres_t2[:, axis])
    reversals += int(np.any(steps > 1e-3) and np.any(steps < -1e-3))
    assert np.all(o.centres_t2 >= o.size_px / 2 - 1e-3)
    assert np.all(o.centres_t2 <= 32 - o.size_px / 2 + 1e-3)
  assert reversals >= 3


def test_background_is_dark_and_its_texture_moves_only_with_a_pan():
  for pan in (0.0, 1.0):
    source = sw.ShapesWorld(sw.ShapesWorldConfig(camera_pan_prob=pan, lengths=(9,)))
    checked = 0
    for i in range(40):
      ex = source.example(i)
      frames, height, width, _ = ex.video.shape
      covered = np.zeros((height, width), bool)
      for o in ex.objects:  # Pixels any object ever touches, with a margin.
        for x, y in o.centres_t2:
          r = o.size_px / 2 + 2
          covered[max(int(y - r), 0):int(y + r) + 1, max(int(x - r), 0):int(x + r) + 1] = True
      if covered.all():
        continue
      bg = ex.video[:, ~covered].astype(np.int16)  # (T, N, 3)
      assert bg.max() <= 45 and bg.min() >= 5
      assert bg.std() > 0.5  # A texture, not a flat fill.
      moved = np.abs(bg[-1] - bg[0]).max()
      assert (moved > 0) == (ex.camera != "static"), (ex.caption, moved)
      checked += 1
    assert checked >= 10


def test_parse_caption_on_examples():
  c = sw.parse_caption("a large red circle moving left")
  assert c == sw.Caption((sw.CaptionObject("red", "circle", "large", "left"),), "static")
  c = sw.parse_caption("a blue square and a yellow triangle moving up, the camera pans right")
  assert [o.motion for o in c.objects] == ["up", "up"] and c.camera == "right"
  assert [o.size for o in c.objects] == ["medium", "medium"]
  c = sw.parse_caption("A small white triangle standing still and a green circle moving down.")
  assert [(o.colour, o.motion) for o in c.objects] == [("white", "static"), ("green", "down")]
  c = sw.parse_caption("a red circle and a small blue square")
  assert [o.motion for o in c.objects] == ["static", "static"] and c.camera == "static"
  assert sw.format_caption(c, image=True) == "a red circle and a small blue square"
  assert sw.format_caption(c) == "a red circle and a small blue square standing still"


@pytest.mark.parametrize("text, match", [
    ("a purple circle moving left", "colour"),
    ("a red hexagon", "shape"),
    ("red circle moving left", "'a'"),
    ("a red circle moving sideways", "direction"),
    ("a medium red circle", "colour"),
    ("a red circle moving left and a blue square", "own motion"),
    ("a red circle, the camera pans left", "image caption"),
    ("a red circle moving left, the camera zooms in", "'pans'"),
    ("a red circle moving left quickly", "end of the caption"),
    ("", "'a'"),
])
def test_parse_caption_rejects_text_outside_the_grammar(text, match):
  with pytest.raises(ValueError, match=match):
    sw.parse_caption(text)


def test_holdout_combos_never_in_train_and_always_first_in_holdout():
  config = sw.ShapesWorldConfig(holdout=HOLDOUT, max_objects=2, camera_pan_prob=0.3)
  held = set(HOLDOUT)
  train = sw.ShapesWorld(config, split="train")
  for i in range(300):
    for o in train.example(i).objects:
      assert (o.colour, o.shape, o.motion) not in held
  holdout = sw.ShapesWorld(config, split="holdout")
  firsts = set()
  for i in range(120):
    ex = holdout.example(i)
    first = ex.objects[0]
    firsts.add((first.colour, first.shape, first.motion))
    assert sw.parse_caption(ex.caption).objects[0].colour == first.colour
    for o in ex.objects[1:]:
      assert (o.colour, o.shape, o.motion) not in held
  assert firsts == held
  with pytest.raises(ValueError, match="holdout"):
    sw.ShapesWorld(sw.ShapesWorldConfig(), split="holdout")


def test_sample_prompts():
  config = sw.ShapesWorldConfig(holdout=HOLDOUT, camera_pan_prob=0.5)
  prompts = sw.sample_prompts(config, 40, seed=3, num_objects=2)
  assert prompts == sw.sample_prompts(config, 40, seed=3, num_objects=2)
  assert prompts != sw.sample_prompts(config, 40, seed=4, num_objects=2)
  held = set(HOLDOUT)
  for text in prompts:
    caption = sw.parse_caption(text)
    assert len(caption.objects) == 2
    assert all((o.colour, o.shape, o.motion) not in held for o in caption.objects)
  assert any(sw.parse_caption(p).camera != "static" for p in prompts)
  for text in sw.sample_prompts(config, 20, seed=0, split="holdout"):
    o = sw.parse_caption(text).objects[0]
    assert (o.colour, o.shape, o.motion) in held
  for text in sw.sample_prompts(config, 10, seed=0, image=True):
    assert "moving" not in text and "still" not in text and "camera" not in text


@pytest.mark.parametrize("kwargs, match", [
    (dict(sizes=((32, 4),)), "sizes"),
    (dict(lengths=(0, 5)), "lengths"),
    (dict(max_objects=6), "max_objects"),
    (dict(holdout=(("purple", "circle", "left"),)), "holdout entry"),
    (dict(lengths=(1,), holdout=tuple((c, s, "static") for c in sw.COLOURS for s in sw.SHAPES)),
     "holds out every combo"),
    (dict(camera_pan_prob=1.5), "camera_pan_prob"),
    (dict(object_sizes=(0.5, 0.4, 0.3)), "object_sizes"),
    (dict(camera_speed=0.03), "cancels"),
    (dict(background=(200, 200, 200)), "background"),
])
def test_config_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sw.ShapesWorldConfig(**kwargs)


def _best_ms(source, indices, repeats=3):
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    for i in indices:
      source[i]
    best = min(best, (time.perf_counter() - start) / len(indices) * 1e3)
  return best


def test_rendering_is_fast():
  tiny = sw.ShapesWorld(sw.ShapesWorldConfig(
      sizes=((32, 32),), lengths=(13,), camera_pan_prob=0.5))
  assert _best_ms(tiny, range(30)) < 5.0
  big = sw.ShapesWorld(sw.ShapesWorldConfig(
      sizes=((256, 256),), lengths=(33,), camera_pan_prob=0.5))
  assert big[0]["video"].shape == (33, 256, 256, 3)
  assert _best_ms(big, range(2), repeats=2) < 200.0
