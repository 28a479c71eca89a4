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

Real data has many native shapes and every bucket costs one compile of the train step, so
`compute_buckets(max_buckets=K)` keeps only the K most common shapes as buckets and crops
every other clip into the largest bucket it contains (same aspect ratio within a tolerance,
enough of its frame kept); the loader then centre-crops the frames and takes a window of the
bucket's length. The report lists every cropped shape, its bucket and the pixels it loses.
"""

import collections
from collections.abc import Callable, Iterable, Sequence
import dataclasses
import math
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
  num_clips: int  # Clips served (native `shape` plus the ones cropped into it).
  tokens_per_clip: int  # Transformer tokens one clip costs, `tokens_per_clip(shape)`.
  # Native (T, H, W) shapes whose clips this bucket serves, sorted; always includes `shape`.
  # A member larger than `shape` is centre-cropped to it by the loader. () means (shape,).
  members: tuple[Shape, ...] = ()

  def __post_init__(self):
    if len(self.shape) != 3 or any(int(d) < 1 for d in self.shape):
      raise ValueError(
          f"Bucket.shape must be (T, H, W) with positive entries, got {self.shape}. "
          "Pass the video shape without the channel axis."
      )
    members = tuple(sorted({_as_shape(m) for m in self.members} | {tuple(self.shape)}))
    for member in members:
      if any(m < b for m, b in zip(member, self.shape)):
        raise ValueError(
            f"Bucket {self.shape} lists member shape {member}, which is smaller along some axis; "
            "a clip can only be cropped into a bucket no larger than it in T, H and W."
        )
    object.__setattr__(self, "members", members)  # Frozen: normalise once, here.
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
class CroppedShape:
  """A native shape without a bucket of its own whose clips are cropped into another bucket."""

  shape: Shape  # (T, H, W) of the cropped clips.
  bucket: Shape  # (T, H, W) of the bucket they are cropped to.
  num_clips: int  # How many counted clips had this shape.
  pixel_fraction_lost: float  # 1 - (bucket T*H*W) / (shape T*H*W): pixels of a clip dropped.
  reason: str  # Why the shape got no bucket of its own.


@dataclasses.dataclass(frozen=True)
class BucketReport:
  """What `compute_buckets` did with every counted clip."""

  total_clips: int  # Clips counted (accepted + rejected).
  clips_per_bucket: dict[Shape, int]  # Accepted clips per bucket shape (cropped ones included).
  rejected: tuple[RejectedShape, ...]  # Shapes without a bucket, most clips first.
  cropped: tuple[CroppedShape, ...] = ()  # Shapes cropped into a bucket, most clips first.

  @property
  def accepted_clips(self) -> int:
    return sum(self.clips_per_bucket.values())

  @property
  def rejected_clips(self) -> int:
    return sum(r.num_clips for r in self.rejected)

  @property
  def cropped_clips(self) -> int:
    return sum(c.num_clips for c in self.cropped)

  @property
  def crop_pixel_fraction_lost(self) -> float:
    """Share of the accepted clips' native pixels (T*H*W summed) that cropping drops."""
    into = collections.Counter()
    for c in self.cropped:
      into[c.bucket] += c.num_clips
    # Clips at their bucket's own shape keep every pixel.
    native = sum(math.prod(s) * (n - into[s]) for s, n in self.clips_per_bucket.items())
    native += sum(c.num_clips * math.prod(c.shape) for c in self.cropped)
    lost = sum(c.num_clips * (math.prod(c.shape) - math.prod(c.bucket)) for c in self.cropped)
    return lost / native if native else 0.0

  def to_dict(self) -> dict[str, Any]:
    """A JSON-ready dict (shapes become "TxHxW" strings) for `report.json` files and logs."""
    return {
        "total_clips": self.total_clips,
        "accepted_clips": self.accepted_clips,
        "rejected_clips": self.rejected_clips,
        "cropped_clips": self.cropped_clips,
        "crop_pixel_fraction_lost": self.crop_pixel_fraction_lost,
        "clips_per_bucket": {_shape_str(s): n for s, n in self.clips_per_bucket.items()},
        "rejected": [
            {"shape": _shape_str(r.shape), "num_clips": r.num_clips, "reason": r.reason}
            for r in self.rejected
        ],
        "cropped": [
            {"shape": _shape_str(c.shape), "bucket": _shape_str(c.bucket),
             "num_clips": c.num_clips, "pixel_fraction_lost": c.pixel_fraction_lost,
             "reason": c.reason}
            for c in self.cropped
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


def aspect_error(shape: Sequence[int], bucket: Sequence[int]) -> float:
  """Relative mismatch of two frame aspect ratios H/W: max(a/b, b/a) - 1 (0 when equal).

  Symmetric, so cropping 16:9 into 4:3 and 4:3 into 16:9 count the same (1/3 here).
  """
  a, b = shape[1] / shape[2], bucket[1] / bucket[2]
  return max(a / b, b / a) - 1.0


def can_crop(shape: Shape, bucket: Shape, *, aspect_tolerance: float, min_kept_area: float) -> bool:
  """Whether clips of `shape` may be centre-cropped into `bucket`.

  The bucket must be no larger along T, H and W; its aspect ratio within `aspect_tolerance`
  (`aspect_error`) of the clip's, so a crop trims borders instead of reframing the scene;
  and it must keep at least `min_kept_area` of the frame area, so a large frame is not cut
  down to a small detail (the caption may describe things near the border). Time has no
  such floor: a shorter window of a video is still a faithful clip of it. But a video is
  never cut to a single frame (an image bucket, T = 1): one frame shows none of the motion
  its caption may describe, so image buckets take images only.
  """
  return (
      all(b <= s for b, s in zip(bucket, shape))
      and (bucket[0] > 1 or shape[0] == 1)
      and aspect_error(shape, bucket) <= aspect_tolerance + 1e-9
      and bucket[1] * bucket[2] >= min_kept_area * shape[1] * shape[2] - 1e-9
  )


def _validate_crop_options(max_buckets: int, aspect_tolerance: float, min_kept_area: float):
  if max_buckets < 0:
    raise ValueError(
        f"max_buckets must be >= 0 (0 = one bucket per shape), got {max_buckets}."
    )
  if not aspect_tolerance >= 0:
    raise ValueError(
        f"aspect_tolerance must be >= 0 (0 crops only into the same aspect ratio), got "
        f"{aspect_tolerance}."
    )
  if not 0 < min_kept_area <= 1:
    raise ValueError(
        f"min_kept_area must be in (0, 1] (the share of the frame area a crop keeps), got "
        f"{min_kept_area}; e.g. 0.5."
    )


def compute_buckets(
    shapes: Iterable[Sequence[int]],
    *,
    tokens_per_clip: Callable[[Shape], int],
    token_budget: int,
    batch_multiple: int,
    max_batch_size: int,
    min_count: int = 1,
    max_buckets: int = 0,
    aspect_tolerance: float = 0.25,
    min_kept_area: float = 0.5,
) -> tuple[list[Bucket], BucketReport]:
  """Groups native clip shapes into buckets sized to a token budget.

  Weights count clips: a bucket's weight is its share of training batches, set to
  (num_clips / batch_size) normalised, i.e. the number of batches one epoch of the bucket
  takes. Every bucket then runs through its clips at the same rate, so every clip is drawn
  equally often and the clips (and tokens) seen in training follow the data's shape
  distribution. (Weighting batches by raw clip counts instead would over-sample the small
  shapes, whose batches hold more clips.)

  Which shapes become buckets: every shape that fits the budget and has >= `min_count`
  clips; with `max_buckets` > 0 only the `max_buckets` of them holding the most clips (ties:
  more tokens first, then the smaller shape tuple).

  Cropping (only when coarsening was asked for: `max_buckets` > 0 or `min_count` > 1; the
  defaults crop nothing): every shape without a bucket of its own -- too rare, beyond
  `max_buckets`, or too big for the budget -- is assigned to the bucket with the most
  tokens (ties: more clips, then the smaller shape) that `can_crop` allows: no larger along
  T, H, W; no image bucket for a video; aspect ratio within `aspect_tolerance` (default
  0.25: 16:9 vs 4:3 is 0.33, so the usual aspect families stay apart while near-equal
  rounded sizes such as 144x256 and 144x240 merge); and >= `min_kept_area` of the frame area
  kept. Its clips count towards that bucket's batch weight, and the bucket lists the shape
  in `members`. Shapes that fit no bucket are rejected with the reason.

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
    min_count: shapes with fewer clips than this get no bucket of their own (each bucket
      costs a compile); with min_count > 1 they are cropped into a larger bucket if possible.
    max_buckets: keep at most this many buckets (0: no limit); the other shapes are cropped.
    aspect_tolerance: largest `aspect_error` between a cropped shape and its bucket.
    min_kept_area: smallest share of a cropped clip's frame area (H*W) its bucket keeps.

  Returns:
    (buckets sorted by shape, report). The report lists the clips per bucket, each cropped
    shape with its bucket and pixel loss, and each rejected shape with its count and reason.

  Raises:
    ValueError: for a bad budget, multiple, cap, crop option or shape, a non-positive
      `tokens_per_clip`, no shapes at all, or when no shape fits (the message lists every
      rejection).
  """
  _validate_budget(token_budget, batch_multiple, max_batch_size, min_count)
  _validate_crop_options(max_buckets, aspect_tolerance, min_kept_area)
  counts = collections.Counter(_as_shape(s) for s in shapes)
  if not counts:
    raise ValueError("compute_buckets got no clip shapes; pass the (T, H, W) of every clip.")

  tokens: dict[Shape, int] = {}
  batch_sizes: dict[Shape, int] = {}
  no_bucket: dict[Shape, str] = {}  # Shape -> why it has no bucket of its own.
  for shape in sorted(counts):
    value = tokens_per_clip(shape)
    if int(value) != value or value < 1:
      raise ValueError(
          f"tokens_per_clip({shape}) returned {value!r}; it must be a positive int number "
          "of transformer tokens per clip."
      )
    tokens[shape] = int(value)
    batch_sizes[shape] = bucket_batch_size(
        tokens[shape], token_budget=token_budget, batch_multiple=batch_multiple,
        max_batch_size=max_batch_size,
    )
    if batch_sizes[shape] < batch_multiple:
      need = batch_multiple * tokens[shape]
      no_bucket[shape] = (
          f"{batch_multiple} clips x {tokens[shape]} tokens = {need} tokens exceed "
          f"token_budget={token_budget}; raise the budget to >= {need} or resize these clips"
      )
    elif counts[shape] < min_count:
      no_bucket[shape] = f"only {counts[shape]} clips < min_count={min_count}"

  ranked = sorted(
      (s for s in counts if s not in no_bucket), key=lambda s: (-counts[s], -tokens[s], s)
  )
  if max_buckets:
    for shape in ranked[max_buckets:]:
      no_bucket[shape] = (
          f"{counts[shape]} clips: not among the max_buckets={max_buckets} shapes with the most "
          "clips"
      )
    ranked = ranked[:max_buckets]
  # Largest bucket first, so each cropped shape loses as little as possible.
  targets = sorted(ranked, key=lambda s: (-tokens[s], -counts[s], s))

  members: dict[Shape, list[Shape]] = {s: [s] for s in ranked}
  clips: dict[Shape, int] = {s: counts[s] for s in ranked}
  cropped: list[CroppedShape] = []
  rejected: list[RejectedShape] = []
  coarsen = max_buckets > 0 or min_count > 1
  for shape in sorted(no_bucket):
    target = None
    if coarsen:
      target = next(
          (b for b in targets if can_crop(
              shape, b, aspect_tolerance=aspect_tolerance, min_kept_area=min_kept_area)),
          None,
      )
    if target is None:
      reason = no_bucket[shape]
      if coarsen:
        reason += (
            f"; and no bucket to crop it into (one no larger in T, H, W, aspect within "
            f"aspect_tolerance={aspect_tolerance}, keeping >= min_kept_area={min_kept_area} of "
            "the frame): raise max_buckets, aspect_tolerance or lower min_kept_area"
        )
      rejected.append(RejectedShape(shape, counts[shape], reason))
      continue
    members[target].append(shape)
    clips[target] += counts[shape]
    lost = 1.0 - math.prod(target) / math.prod(shape)
    cropped.append(CroppedShape(shape, target, counts[shape], lost, no_bucket[shape]))

  rejected.sort(key=lambda r: (-r.num_clips, r.shape))
  cropped.sort(key=lambda c: (-c.num_clips, c.shape))
  if not ranked:
    details = "; ".join(
        f"{_shape_str(r.shape)} ({r.num_clips} clips): {r.reason}" for r in rejected
    )
    raise ValueError(f"no clip shape fits a bucket, so there is nothing to train on: {details}.")

  accepted = sorted(ranked)
  batches_per_epoch = [clips[s] / batch_sizes[s] for s in accepted]
  total = sum(batches_per_epoch)
  buckets = [
      Bucket(shape=s, batch_size=batch_sizes[s], weight=epoch / total, num_clips=clips[s],
             tokens_per_clip=tokens[s], members=tuple(members[s]))
      for s, epoch in zip(accepted, batches_per_epoch)
  ]
  report = BucketReport(
      total_clips=sum(counts.values()),
      clips_per_bucket={b.shape: b.num_clips for b in buckets},
      rejected=tuple(rejected),
      cropped=tuple(cropped),
  )
  return buckets, report


def describe_buckets(buckets: Sequence[Bucket]) -> str:
  """A fixed-width table of the buckets for logs: shape, tokens, batch, weight, clips.

  When some bucket serves cropped shapes, a last column counts the native shapes it serves.
  """
  header = ("shape (TxHxW)", "tokens/clip", "batch", "tokens/batch", "weight", "clips")
  rows = [
      (_shape_str(b.shape), str(b.tokens_per_clip), str(b.batch_size), str(b.tokens_per_batch),
       f"{b.weight:.3f}", str(b.num_clips))
      for b in buckets
  ]
  if any(len(b.members) > 1 for b in buckets):
    header += ("native shapes",)
    rows = [r + (str(len(b.members)),) for r, b in zip(rows, buckets)]
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

  def line(cells):
    return "  ".join(c.rjust(w) for c, w in zip(cells, widths)).rstrip()

  total_clips = sum(b.num_clips for b in buckets)
  footer = f"{len(buckets)} buckets, {total_clips} clips"
  return "\n".join([line(header), *(line(r) for r in rows), footer])
