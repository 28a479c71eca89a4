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
