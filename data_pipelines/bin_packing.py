"""Pure bin packing of token counts into fixed-length rows, and what it costs in padding.

NaViT (Dehghani et al. 2023, "Patch n' Pack") packs the token sequences of several clips into
one row of L tokens. This module decides only WHICH items share a row, from their token
counts: no clip is read, so a padding estimate for a million clips takes seconds, and the
Grain pipeline (`data_pipelines.packing`) and the benchmarks share one packing rule.

`first_fit(..., num_bins=N)` reproduces the rows of grain's online packer
(`grain.experimental.FirstFitPackIterDataset` with N open bins, no bin shuffle) exactly;
`num_bins=None` is offline first-fit (every row stays open), a lower bound on the padding.
"""

from collections.abc import Callable, Sequence
import dataclasses
from typing import Any

Shape = tuple[int, int, int]


def check_positive(**values: int) -> None:
  """Raises a ValueError naming each argument that is not >= 1 (row lengths, counts, bins)."""
  for name, value in values.items():
    if int(value) < 1:
      raise ValueError(f"{name}={value} must be >= 1.")


def _check_counts(token_counts: Sequence[int], seq_len: int, max_segments: int) -> list[int]:
  check_positive(seq_len=seq_len, max_segments=max_segments)
  counts = [int(c) for c in token_counts]
  bad = [(i, c) for i, c in enumerate(counts) if not 1 <= c <= seq_len]
  if bad:
    raise ValueError(
        f"{len(bad)} items have token counts outside [1, seq_len={seq_len}] (first: item "
        f"{bad[0][0]} with {bad[0][1]} tokens). Raise seq_len (data.pack_length) to at least "
        f"{max(c for _, c in bad)} or drop those items (see packing_report)."
    )
  return counts


def _pack(
    counts: list[int], seq_len: int, max_segments: int, num_bins: int | None, best: bool
) -> list[list[int]]:
  """Shared loop of first_fit / best_fit; `best` picks the fullest row that still fits."""
  if num_bins is not None and num_bins < 1:
    raise ValueError(f"num_bins={num_bins} must be >= 1 (or None: every row stays open).")
  smallest = min(counts, default=0)
  rows: list[list[int]] = []  # every row, in creation order
  free: list[int] = []
  open_rows: list[int] = []  # rows a later item may still enter, in creation order
  for i, c in enumerate(counts):
    fits = [r for r in open_rows if free[r] >= c and len(rows[r]) < max_segments]
    if fits:
      row = min(fits, key=lambda r: free[r]) if best else fits[0]
    else:
      if num_bins is not None and len(open_rows) == num_bins:
        open_rows = []  # Grain's online policy: the whole set of bins is emitted at once.
      row = len(rows)
      rows.append([])
      free.append(seq_len)
      open_rows.append(row)
    rows[row].append(i)
    free[row] -= c
    # Offline, a row that no item can enter any more leaves the scan (keeps it near O(n)).
    # Online it must stay: it still occupies one of the num_bins bins until the flush.
    if num_bins is None and (free[row] < smallest or len(rows[row]) == max_segments):
      open_rows.remove(row)
  return rows


def first_fit(
    token_counts: Sequence[int], *, seq_len: int, max_segments: int, num_bins: int | None = None
) -> list[list[int]]:
  """First-fit bin packing: which items (positions in `token_counts`) share each row.

  Items are taken in the given order; each goes to the earliest row with room for its tokens
  and fewer than `max_segments` items, else opens a new row.

  Args:
    token_counts: tokens of each item, each in [1, seq_len].
    seq_len: tokens per row (L).
    max_segments: most items per row (G).
    num_bins: None keeps every row open (offline first-fit, the least padding). An int
      reproduces grain's FirstFitPackIterDataset: at most `num_bins` rows are open, and when an
      item fits none of them they are all closed and the item starts a fresh set.

  Returns:
    Rows in creation order, each a list of item positions in the order they were added (which
    is their segment order: segment id = position in the row + 1).
  """
  counts = _check_counts(token_counts, seq_len, max_segments)
  return _pack(counts, seq_len, max_segments, num_bins, best=False)


def best_fit(
    token_counts: Sequence[int], *, seq_len: int, max_segments: int, num_bins: int | None = None
) -> list[list[int]]:
  """Like `first_fit`, but each item goes to the fullest row that still has room for it."""
  counts = _check_counts(token_counts, seq_len, max_segments)
  return _pack(counts, seq_len, max_segments, num_bins, best=True)


def padding_fraction(
    rows: Sequence[Sequence[int]], token_counts: Sequence[int], *, seq_len: int
) -> float:
  """Padding share of packed rows: 1 - (real tokens) / (rows * seq_len).

  Args:
    rows: from first_fit / best_fit (positions into token_counts).
    token_counts: tokens of each item.
    seq_len: tokens per row.
  """
  if not rows:
    raise ValueError("no rows: pack at least one item before measuring padding.")
  real = sum(int(token_counts[i]) for row in rows for i in row)
  if real > len(rows) * seq_len:
    raise ValueError(
        f"{real} tokens cannot fit {len(rows)} rows of seq_len={seq_len}; pass the seq_len the "
        "rows were packed with."
    )
  return 1.0 - real / (len(rows) * seq_len)


# ----------------------------------------------------------------------------- reports


@dataclasses.dataclass(frozen=True)
class OversizedShape:
  """Clips of one shape whose tokens exceed the row length."""

  shape: Shape
  tokens: int
  count: int
  example_indices: tuple[int, ...]  # up to 5 source indices, to find the clips


@dataclasses.dataclass(frozen=True)
class PackingReport:
  """What packing will do with a set of clips (JSON-ready through to_dict)."""

  seq_len: int
  num_clips: int  # clips checked (all processes)
  num_tokens: int  # their tokens, oversized clips included
  oversized: tuple[OversizedShape, ...]  # shapes that fit no row, largest first
  # Filled by packing.make_packed_dataset for this process's clips, from grain's policy on
  # one shuffled epoch (a bounded sample of clips); None from packing_report alone.
  padding_fraction: float | None = None
  clips_per_row: float | None = None

  @property
  def num_oversized(self) -> int:
    return sum(o.count for o in self.oversized)

  def describe(self) -> str:
    """One line per oversized shape, e.g. '  (7, 12, 24): 504 tokens > 256, 3 clips [4, 9, 17]'."""
    return "\n".join(
        f"  {o.shape}: {o.tokens} tokens > {self.seq_len}, {o.count} clips "
        f"{list(o.example_indices)}" for o in self.oversized
    )

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self) | {"num_oversized": self.num_oversized}


def packing_report(
    shapes: Sequence[Sequence[int]],
    tokens_per_clip: Callable[[Shape], int],
    seq_len: int,
    *,
    indices: Sequence[int] | None = None,
) -> PackingReport:
  """Lists the clip shapes whose tokens exceed `seq_len` (they can never be packed).

  Args:
    shapes: one shape per clip (whatever `tokens_per_clip` takes, e.g. latent (t, h, w)).
    tokens_per_clip: shape -> tokens, e.g.
      functools.partial(packing.latent_tokens, patch=(1, 2, 2)).
    seq_len: tokens per packed row.
    indices: source index of each clip (for the report's examples); default 0..N-1.
  """
  if seq_len < 1:
    raise ValueError(f"seq_len={seq_len} must be >= 1.")
  indices = range(len(shapes)) if indices is None else indices
  if len(indices) != len(shapes):
    raise ValueError(f"got {len(indices)} indices for {len(shapes)} shapes; pass one per shape.")
  tokens_of: dict[Shape, int] = {}
  members: dict[Shape, list[int]] = {}
  total = 0
  for index, shape in zip(indices, shapes):
    shape = tuple(int(d) for d in shape)
    if shape not in tokens_of:
      tokens_of[shape] = int(tokens_per_clip(shape))
    total += tokens_of[shape]
    if tokens_of[shape] > seq_len:
      members.setdefault(shape, []).append(int(index))
  oversized = tuple(
      OversizedShape(shape=s, tokens=tokens_of[s], count=len(m), example_indices=tuple(m[:5]))
      for s, m in sorted(members.items(), key=lambda kv: -tokens_of[kv[0]])
  )
  return PackingReport(
      seq_len=seq_len, num_clips=len(shapes), num_tokens=total, oversized=oversized
  )
