"""Shape buckets: one fixed global batch shape per native video (T, H, W).

The trainer learns from clips at their native length and aspect ratio instead of cropping
them to one square size (Sora technical report, Brooks et al. 2024, "Sampling flexibility":
training on native aspect ratios improves framing and composition). A jitted train step
compiles once per input shape, so clips are grouped into buckets of one shape each, and
each bucket gets the batch size that fills a fixed token budget (the NaViT and Patch n' Pack
observation, Dehghani et al. 2023: equal tokens per step keeps step time and memory flat
across resolutions).

Buckets are computed from the data, never written by hand: `compute_buckets` counts the
distinct shapes, sizes each batch to the budget and weights each bucket by how many clips it
holds. Shapes that cannot fit are reported with their clip counts, never dropped silently.
"""

import collections
from collections.abc import Callable, Iterable, Sequence
import dataclasses
from typing import Any

Shape = tuple[int, int, int]  # (T, H, W) of a video: frames, pixel height, pixel width.


@dataclasses.dataclass(frozen=True)
class Bucket:
  """One batch shape of the training mix.

  Every batch drawn from a bucket holds `batch_size` clips (over all processes together)
  of exactly `shape`, so the train step sees one compiled shape per bucket.
  """

  shape: Shape  # (T, H, W) native video shape (frames, pixels) of every clip in the bucket.
  batch_size: int  # Global batch size over all processes: a multiple of the data shards.
  weight: float  # Share of training BATCHES drawn from this bucket; the weights sum to 1.
  num_clips: int  # Clips of this shape among the shapes `compute_buckets` counted.
  tokens_per_clip: int  # Transformer tokens one clip costs, `tokens_per_clip(shape)`.

  def __post_init__(self):
    if len(self.shape) != 3 or any(int(d) < 1 for d in self.shape):
      raise ValueError(
          f"Bucket.shape must be (T, H, W) with positive entries, got {self.shape}. "
          "Pass the video shape without the channel axis."
      )
    for name in ("batch_size", "num_clips", "tokens_per_clip"):
      if getattr(self, name) < 1:
        raise ValueError(f"Bucket.{name} must be >= 1, got {getattr(self, name)} for {self.shape}.")
    if not 0.0 < self.weight <= 1.0:
      raise ValueError(f"Bucket.weight must be in (0, 1], got {self.weight} for {self.shape}.")

  @property
  def tokens_per_batch(self) -> int:
    """Tokens of one global batch of this bucket (at most the token budget)."""
    return self.batch_size * self.tokens_per_clip


@dataclasses.dataclass(frozen=True)
class RejectedShape:
  """A native shape that got no bucket, with why and how much data it holds."""

  shape: Shape  # (T, H, W) of the rejected clips.
  num_clips: int  # How many counted clips had this shape.
  reason: str  # Human-readable rule that rejected it, with the numbers.


@dataclasses.dataclass(frozen=True)
class BucketReport:
  """What `compute_buckets` did with every counted clip."""

  total_clips: int  # Clips counted (accepted + rejected).
  clips_per_bucket: dict[Shape, int]  # Accepted clips per bucket shape.
  rejected: tuple[RejectedShape, ...]  # Shapes without a bucket, most clips first.

  @property
  def accepted_clips(self) -> int:
    return sum(self.clips_per_bucket.values())

  @property
  def rejected_clips(self) -> int:
    return sum(r.num_clips for r in self.rejected)

  def to_dict(self) -> dict[str, Any]:
    """A JSON-ready dict (shapes become "TxHxW" strings) for `report.json` files and logs."""
    return {
        "total_clips": self.total_clips,
        "accepted_clips": self.accepted_clips,
        "rejected_clips": self.rejected_clips,
        "clips_per_bucket": {_shape_str(s): n for s, n in self.clips_per_bucket.items()},
        "rejected": [
            {"shape": _shape_str(r.shape), "num_clips": r.num_clips, "reason": r.reason}
            for r in self.rejected
        ],
    }


def _shape_str(shape: Shape) -> str:
  return "x".join(str(d) for d in shape)


def _as_shape(shape: Any) -> Shape:
  """Validates one (T, H, W) entry and returns it as a tuple of Python ints."""
  try:
    values = tuple(int(d) for d in shape)
  except (TypeError, ValueError) as e:
    raise ValueError(f"a clip shape must be a (T, H, W) tuple of ints, got {shape!r}.") from e
  if len(values) != 3 or any(d < 1 for d in values):
    raise ValueError(
        f"a clip shape must be (T, H, W) with three positive entries, got {shape!r}. "
        "Pass the video shape without the channel axis, e.g. (17, 64, 96)."
    )
  return values


def _validate_budget(token_budget: int, batch_multiple: int, max_batch_size: int, min_count: int):
  if token_budget < 1:
    raise ValueError(
        f"token_budget must be a positive number of tokens per global batch, got {token_budget}."
    )
  if batch_multiple < 1:
    raise ValueError(
        f"batch_multiple must be >= 1 (data-parallel shards x processes), got {batch_multiple}."
    )
  if max_batch_size < batch_multiple or max_batch_size % batch_multiple:
    raise ValueError(
        f"max_batch_size={max_batch_size} must be a positive multiple of "
        f"batch_multiple={batch_multiple}; use e.g. "
        f"{max(batch_multiple, max_batch_size - max_batch_size % batch_multiple)}."
    )
  if min_count < 1:
    raise ValueError(f"min_count must be >= 1 clip, got {min_count}.")


def bucket_batch_size(
    tokens: int, *, token_budget: int, batch_multiple: int, max_batch_size: int
) -> int:
  """Global batch size for clips of `tokens` tokens, or 0 when none fits the budget.

  floor(token_budget / tokens), rounded down to a multiple of `batch_multiple` (every data
  shard must get the same number of clips), capped at `max_batch_size`.
  """
  fitting = token_budget // tokens
  return min(max_batch_size, fitting - fitting % batch_multiple)


def compute_buckets(
    shapes: Iterable[Sequence[int]],
    *,
    tokens_per_clip: Callable[[Shape], int],
    token_budget: int,
    batch_multiple: int,
    max_batch_size: int,
    min_count: int = 1,
) -> tuple[list[Bucket], BucketReport]:
  """Groups native clip shapes into buckets sized to a token budget.

  Weights count clips: a bucket's weight is its share of training batches, set to
  (num_clips / batch_size) normalised, i.e. the number of batches one epoch of the bucket
  takes. Every bucket then runs through its clips at the same rate, so every clip is drawn
  equally often and the clips (and tokens) seen in training follow the data's shape
  distribution. (Weighting batches by raw clip counts instead would over-sample the small
  shapes, whose batches hold more clips.)

  Every process must call this with the same global `shapes` (in any order): the buckets,
  which are sorted by shape, fix the bucket schedule that all processes must share.

  Args:
    shapes: the (T, H, W) of every counted clip, one entry per clip (repeats count).
    tokens_per_clip: (T, H, W) -> the transformer tokens one clip of that shape costs
      (latent frames x latent height x latent width / patch volume).
    token_budget: tokens in one global batch (all processes together).
    batch_multiple: global batch sizes are multiples of this: the data-parallel shards times
      anything else the batch must divide evenly over (processes).
    max_batch_size: cap on any global batch size (a multiple of `batch_multiple`), so tiny
      shapes such as single images do not get absurdly large batches.
    min_count: shapes with fewer clips than this get no bucket (each bucket costs a compile).

  Returns:
    (buckets sorted by shape, report). The report lists the clips per bucket and each
    rejected shape with its clip count and reason.

  Raises:
    ValueError: for a bad budget, multiple, cap or shape, a non-positive `tokens_per_clip`,
      no shapes at all, or when no shape fits (the message lists every rejection).
  """
  _validate_budget(token_budget, batch_multiple, max_batch_size, min_count)
  counts = collections.Counter(_as_shape(s) for s in shapes)
  if not counts:
    raise ValueError("compute_buckets got no clip shapes; pass the (T, H, W) of every clip.")

  accepted: list[tuple[Shape, int, int, int]] = []  # (shape, batch_size, num_clips, tokens)
  rejected: list[RejectedShape] = []
  for shape in sorted(counts):
    num_clips = counts[shape]
    tokens = tokens_per_clip(shape)
    if int(tokens) != tokens or tokens < 1:
      raise ValueError(
          f"tokens_per_clip({shape}) returned {tokens!r}; it must be a positive int number "
          "of transformer tokens per clip."
      )
    tokens = int(tokens)
    batch_size = bucket_batch_size(
        tokens, token_budget=token_budget, batch_multiple=batch_multiple,
        max_batch_size=max_batch_size,
    )
    if batch_size < batch_multiple:
      reason = (
          f"{batch_multiple} clips x {tokens} tokens = {batch_multiple * tokens} tokens exceed "
          f"token_budget={token_budget}; raise the budget to >= {batch_multiple * tokens} or "
          "resize these clips"
      )
      rejected.append(RejectedShape(shape, num_clips, reason))
    elif num_clips < min_count:
      reason = f"only {num_clips} clips < min_count={min_count}"
      rejected.append(RejectedShape(shape, num_clips, reason))
    else:
      accepted.append((shape, batch_size, num_clips, tokens))

  rejected.sort(key=lambda r: (-r.num_clips, r.shape))
  if not accepted:
    details = "; ".join(
        f"{_shape_str(r.shape)} ({r.num_clips} clips): {r.reason}" for r in rejected
    )
    raise ValueError(f"no clip shape fits a bucket, so there is nothing to train on: {details}.")

  batches_per_epoch = [num_clips / batch_size for _, batch_size, num_clips, _ in accepted]
  total = sum(batches_per_epoch)
  buckets = [
      Bucket(shape=shape, batch_size=batch_size, weight=epoch / total, num_clips=num_clips,
             tokens_per_clip=tokens)
      for (shape, batch_size, num_clips, tokens), epoch in zip(accepted, batches_per_epoch)
  ]
  report = BucketReport(
      total_clips=sum(counts.values()),
      clips_per_bucket={b.shape: b.num_clips for b in buckets},
      rejected=tuple(rejected),
  )
  return buckets, report


def describe_buckets(buckets: Sequence[Bucket]) -> str:
  """A fixed-width table of the buckets for logs: shape, tokens, batch, weight, clips."""
  header = ("shape (TxHxW)", "tokens/clip", "batch", "tokens/batch", "weight", "clips")
  rows = [
      (_shape_str(b.shape), str(b.tokens_per_clip), str(b.batch_size), str(b.tokens_per_batch),
       f"{b.weight:.3f}", str(b.num_clips))
      for b in buckets
  ]
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

  def line(cells):
    return "  ".join(c.rjust(w) for c, w in zip(cells, widths)).rstrip()

  total_clips = sum(b.num_clips for b in buckets)
  footer = f"{len(buckets)} buckets, {total_clips} clips"
  return "\n".join([line(header), *(line(r) for r in rows), footer])
