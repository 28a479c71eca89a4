"""Tests for data_pipelines.buckets: batch sizing, weights, rejections, errors."""

import json

import pytest

from data_pipelines import buckets as buckets_lib


def _voxels(shape):
  """Tokens per clip = T * H * W (a patch of one pixel-frame), easy to compute by hand."""
  t, h, w = shape
  return t * h * w


def _compute(shapes, **overrides):
  kwargs = dict(tokens_per_clip=_voxels, token_budget=1000, batch_multiple=4, max_batch_size=32)
  kwargs.update(overrides)
  return buckets_lib.compute_buckets(shapes, **kwargs)


def test_batch_sizes_obey_budget_multiple_and_cap():
  shapes = [(1, 4, 4)] * 10 + [(3, 4, 6)] * 6 + [(5, 8, 4)] * 3  # 16, 72, 160 tokens
  buckets, _ = _compute(shapes)
  by_shape = {b.shape: b for b in buckets}
  # 1000 // 16 = 62 -> capped at 32; 1000 // 72 = 13 -> 12; 1000 // 160 = 6 -> 4.
  assert {s: b.batch_size for s, b in by_shape.items()} == {
      (1, 4, 4): 32, (3, 4, 6): 12, (5, 8, 4): 4,
  }
  for b in buckets:
    assert b.batch_size % 4 == 0
    assert b.tokens_per_batch <= 1000
    assert b.tokens_per_clip == _voxels(b.shape)
    assert b.num_clips == shapes.count(b.shape)


def test_buckets_are_sorted_and_independent_of_input_order():
  shapes = [(5, 8, 4), (1, 4, 4), (3, 4, 6), (1, 4, 4)]
  forward, _ = _compute(shapes)
  backward, _ = _compute(shapes[::-1])
  assert forward == backward
  assert [b.shape for b in forward] == sorted(b.shape for b in forward)


def test_weights_sum_to_one_and_draw_every_clip_equally_often():
  shapes = [(1, 4, 4)] * 64 + [(3, 4, 6)] * 24 + [(5, 8, 4)] * 8
  buckets, _ = _compute(shapes)
  assert sum(b.weight for b in buckets) == pytest.approx(1.0)
  # Clips drawn per step from bucket k: weight_k * batch_k. Per clip of the bucket that rate
  # must be the same for every bucket (clip-weighted mix follows the shape distribution).
  rates = [b.weight * b.batch_size / b.num_clips for b in buckets]
  assert max(rates) == pytest.approx(min(rates))
  # Batches per epoch: 64/32 = 2, 24/12 = 2, 8/4 = 2 -> equal batch shares.
  assert [b.weight for b in buckets] == pytest.approx([1 / 3] * 3)


def test_oversized_and_rare_shapes_are_reported_not_dropped():
  shapes = [(1, 4, 4)] * 10 + [(9, 16, 16)] * 3 + [(3, 4, 6)] * 1
  buckets, report = _compute(shapes, min_count=2)
  assert [b.shape for b in buckets] == [(1, 4, 4)]
  assert report.total_clips == 14
  assert report.accepted_clips == 10 and report.rejected_clips == 4
  assert report.clips_per_bucket == {(1, 4, 4): 10}
  rejected = {r.shape: r for r in report.rejected}
  assert rejected[(9, 16, 16)].num_clips == 3
  too_big = rejected[(9, 16, 16)].reason
  assert "2304 tokens" in too_big and "token_budget=1000" in too_big
  assert rejected[(3, 4, 6)].num_clips == 1 and "min_count=2" in rejected[(3, 4, 6)].reason
  assert [r.shape for r in report.rejected] == [(9, 16, 16), (3, 4, 6)]  # most clips first
  as_dict = json.loads(json.dumps(report.to_dict()))
  assert as_dict["rejected"][0] == {
      "shape": "9x16x16", "num_clips": 3, "reason": rejected[(9, 16, 16)].reason,
  }


def test_shape_fitting_once_but_not_at_the_multiple_is_rejected():
  # 300 tokens: 3 clips fit 1000, but the multiple is 4 (4 x 300 = 1200 > 1000).
  buckets, report = _compute([(3, 10, 10)] * 5 + [(1, 4, 4)] * 5)
  assert [b.shape for b in buckets] == [(1, 4, 4)]
  assert report.rejected[0].shape == (3, 10, 10) and "1200 tokens" in report.rejected[0].reason


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(token_budget=0), "token_budget"),
        (dict(batch_multiple=0), "batch_multiple"),
        (dict(max_batch_size=30), "max_batch_size=30 must be a positive multiple"),
        (dict(max_batch_size=2), "max_batch_size=2"),
        (dict(min_count=0), "min_count"),
        (dict(tokens_per_clip=lambda s: 0), "tokens_per_clip"),
        (dict(tokens_per_clip=lambda s: 2.5), "tokens_per_clip"),
        (dict(token_budget=10), "no clip shape fits"),
    ],
)
def test_bad_arguments_raise_clear_errors(overrides, match):
  with pytest.raises(ValueError, match=match):
    _compute([(1, 4, 4)] * 3, **overrides)


@pytest.mark.parametrize("shapes", [[], [(1, 4)], [(0, 4, 4)], ["abc"]])
def test_bad_shapes_raise(shapes):
  with pytest.raises(ValueError, match="shape"):
    _compute(shapes)


def test_bucket_validates_its_fields():
  with pytest.raises(ValueError, match="weight"):
    buckets_lib.Bucket(shape=(1, 4, 4), batch_size=4, weight=0.0, num_clips=1, tokens_per_clip=16)
  with pytest.raises(ValueError, match="batch_size"):
    buckets_lib.Bucket(shape=(1, 4, 4), batch_size=0, weight=1.0, num_clips=1, tokens_per_clip=16)


def test_describe_buckets_renders_one_row_per_bucket():
  buckets, _ = _compute([(1, 4, 4)] * 10 + [(3, 4, 6)] * 6)
  table = buckets_lib.describe_buckets(buckets)
  lines = table.splitlines()
  assert lines[0].split() == [
      "shape", "(TxHxW)", "tokens/clip", "batch", "tokens/batch", "weight", "clips",
  ]
  assert lines[1].split() == ["1x4x4", "16", "32", "512", f"{buckets[0].weight:.3f}", "10"]
  assert lines[2].split()[:3] == ["3x4x6", "72", "12"]
  assert lines[-1] == "2 buckets, 16 clips"


# --- Coarsening: max_buckets and crop-to-bucket --------------------------------------------


def test_aspect_error_and_can_crop_follow_their_rules():
  assert buckets_lib.aspect_error((1, 9, 16), (1, 9, 16)) == 0.0
  # 16:9 vs 4:3 is 1/3 either way round; 144x256 vs 144x240 is 1/15.
  assert buckets_lib.aspect_error((1, 144, 256), (1, 144, 192)) == pytest.approx(1 / 3)
  assert buckets_lib.aspect_error((1, 144, 192), (1, 144, 256)) == pytest.approx(1 / 3)
  assert buckets_lib.aspect_error((1, 144, 256), (1, 144, 240)) == pytest.approx(1 / 15)
  ok = dict(aspect_tolerance=0.25, min_kept_area=0.5)
  assert buckets_lib.can_crop((9, 16, 16), (5, 12, 12), **ok)  # 144/256 = 0.56 of the area
  assert not buckets_lib.can_crop((9, 16, 16), (5, 8, 8), **ok)  # keeps only 1/4 of the frame
  assert not buckets_lib.can_crop((5, 16, 16), (9, 16, 16), **ok)  # bucket longer than the clip
  assert not buckets_lib.can_crop((5, 16, 32), (5, 16, 16), **ok)  # 2:1 into 1:1


def test_defaults_crop_nothing():
  # (9, 16, 16) could be cropped into (5, 12, 12), but without max_buckets or min_count > 1
  # the buckets are exactly one per fitting shape, as before coarsening existed.
  buckets, report = _compute([(5, 12, 12)] * 4 + [(9, 16, 16)] * 2, token_budget=3000)
  assert [(b.shape, b.members) for b in buckets] == [((5, 12, 12), ((5, 12, 12),))]
  assert report.cropped == () and report.rejected[0].shape == (9, 16, 16)


def test_max_buckets_keeps_the_commonest_shapes_and_crops_the_rest_into_the_largest_fit():
  shapes = (
      [(1, 4, 4)] * 10 + [(3, 8, 8)] * 6 + [(3, 6, 6)] * 6  # 16, 192, 108 tokens
      + [(5, 8, 8)] * 2  # -> (3, 8, 8): the largest bucket it contains
      + [(3, 8, 6)] * 2  # -> (3, 6, 6): aspect 4:3 vs 1:1 is 0.33 > 0.25 -> rejected
      + [(1, 6, 6)] * 1  # -> (1, 4, 4)? only 0.44 of the area: rejected
  )
  buckets, report = _compute(shapes, max_buckets=3, token_budget=2000)
  # Ties at 6 clips: the shape with more tokens ranks first (both are kept here).
  assert [b.shape for b in buckets] == [(1, 4, 4), (3, 6, 6), (3, 8, 8)]
  by_shape = {b.shape: b for b in buckets}
  assert by_shape[(3, 8, 8)].members == ((3, 8, 8), (5, 8, 8))
  assert by_shape[(3, 8, 8)].num_clips == 8  # Batch weights count the cropped clips.
  assert report.clips_per_bucket[(3, 8, 8)] == 8
  assert [(c.shape, c.bucket, c.num_clips) for c in report.cropped] == [((5, 8, 8), (3, 8, 8), 2)]
  assert report.cropped[0].pixel_fraction_lost == pytest.approx(1 - 192 / 320)
  assert "max_buckets=3" in report.cropped[0].reason
  rejected = {r.shape: r.reason for r in report.rejected}
  assert set(rejected) == {(3, 8, 6), (1, 6, 6)} and "no bucket to crop it into" in rejected[(3, 8, 6)]
  assert report.accepted_clips + report.rejected_clips == report.total_clips == len(shapes)
  # Lost pixels over all accepted native pixels: 2 clips x 128 of 10x16 + 6x192 + 6x108 + 2x320.
  assert report.crop_pixel_fraction_lost == pytest.approx(256 / (160 + 1152 + 648 + 640))
  rates = [b.weight * b.batch_size / b.num_clips for b in buckets]
  assert max(rates) == pytest.approx(min(rates))
  as_dict = json.loads(json.dumps(report.to_dict()))
  assert as_dict["cropped"][0]["shape"] == "5x8x8" and as_dict["cropped"][0]["bucket"] == "3x8x8"
  assert as_dict["cropped_clips"] == 2
  table = buckets_lib.describe_buckets(buckets)
  assert "native shapes" in table.splitlines()[0] and table.splitlines()[3].split()[-1] == "2"


def test_ties_in_clip_count_prefer_more_tokens():
  buckets, report = _compute([(1, 4, 4)] * 5 + [(3, 4, 4)] * 5, max_buckets=1)
  assert [b.shape for b in buckets] == [(3, 4, 4)]
  assert report.rejected[0].shape == (1, 4, 4)  # Shorter than the bucket: cannot crop up.


def test_min_count_crops_rare_shapes_and_oversized_shapes_into_a_bucket():
  shapes = [(5, 8, 8)] * 6 + [(5, 8, 10)] * 1 + [(9, 12, 12)] * 3  # 9x12x12 = 1296 > budget
  buckets, report = _compute(shapes, min_count=2, token_budget=1300, max_batch_size=4)
  assert [b.members for b in buckets] == [((5, 8, 8), (5, 8, 10))]
  assert report.rejected[0].shape == (9, 12, 12)  # keeps 64/144 < 0.5 of its frame
  assert "token_budget=1300" in report.rejected[0].reason
  buckets, report = _compute(shapes, min_count=2, token_budget=1300, max_batch_size=4,
                             min_kept_area=0.4)
  assert buckets[0].members == ((5, 8, 8), (5, 8, 10), (9, 12, 12)) and not report.rejected
  assert buckets[0].num_clips == 10


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(max_buckets=-1), "max_buckets"),
        (dict(aspect_tolerance=-0.1), "aspect_tolerance"),
        (dict(min_kept_area=0.0), "min_kept_area"),
        (dict(min_kept_area=1.5), "min_kept_area"),
    ],
)
def test_bad_crop_options_raise(overrides, match):
  with pytest.raises(ValueError, match=match):
    _compute([(1, 4, 4)] * 3, **overrides)


def test_bucket_members_must_contain_the_bucket():
  bucket = buckets_lib.Bucket(shape=(3, 4, 4), batch_size=4, weight=1.0, num_clips=2,
                              tokens_per_clip=48, members=((5, 4, 4),))
  assert bucket.members == ((3, 4, 4), (5, 4, 4))
  with pytest.raises(ValueError, match="smaller along some axis"):
    buckets_lib.Bucket(shape=(3, 4, 4), batch_size=4, weight=1.0, num_clips=2,
                       tokens_per_clip=48, members=((1, 4, 4),))


def test_videos_are_never_cropped_into_image_buckets():
  ok = dict(aspect_tolerance=0.25, min_kept_area=0.5)
  assert not buckets_lib.can_crop((5, 8, 8), (1, 8, 8), **ok)
  assert buckets_lib.can_crop((1, 10, 10), (1, 8, 8), **ok)
  _, report = _compute([(1, 8, 8)] * 5 + [(5, 8, 8)] * 2, max_buckets=1)
  assert report.rejected[0].shape == (5, 8, 8)
