"""Spacetime patches: latent (B,T,H,W,C) <-> tokens (B,L,P) and their 3D grid positions.

A latent is cut into non-overlapping (pt, ph, pw) boxes, each flattened to P = pt*ph*pw*C values
(ViT, Dosovitskiy et al. 2021; spacetime patches as in Sora and Latte, Ma et al. 2024). Tokens are
ordered t-major, then h, then w, so token `l` sits at grid coordinate
`(l // (gh*gw), (l // gw) % gh, l % gw)`; `grid_positions` gives these coordinates for rotary
position embeddings. Nothing here is learned, so any (T,H,W) that the patch divides is valid.
"""

import numpy as np
import jax.numpy as jnp

Patch = tuple[int, int, int]
Grid = tuple[int, int, int]


def _check_patch(patch: Patch) -> None:
  if len(patch) != 3 or any(int(p) < 1 for p in patch):
    raise ValueError(
        f"patch size {tuple(patch)} must be three positive integers (pt, ph, pw), e.g. (1, 2, 2)."
    )


def patch_grid(latent_thw: tuple[int, int, int], patch: Patch) -> Grid:
  """Returns the token grid (T/pt, H/ph, W/pw) of a latent, checking divisibility.

  Args:
    latent_thw: latent (T, H, W).
    patch: (pt, ph, pw).

  Returns:
    (gt, gh, gw), the number of patches along each axis.

  Raises:
    ValueError: when a latent dimension is not a multiple of its patch size.
  """
  _check_patch(patch)
  grid = []
  for name, size, p in zip(("frames T", "height H", "width W"), latent_thw, patch):
    if size % p:
      below, above = size - size % p, size - size % p + p
      fix = f"crop it to {below} or pad it to {above}" if below else f"pad it to {above}"
      raise ValueError(
          f"latent {name}={size} is not divisible by the patch size {p} (patch {tuple(patch)}); "
          f"{fix}, or choose a patch size that divides it."
      )
    grid.append(size // p)
  return tuple(grid)


def patchify(x_bthwc: jnp.ndarray, patch: Patch) -> jnp.ndarray:
  """Cuts a latent into spacetime patches.

  Args:
    x_bthwc: latent (B, T, H, W, C).
    patch: (pt, ph, pw); each must divide the matching latent dimension.

  Returns:
    x_blp: (B, L, P) with L = (T/pt)(H/ph)(W/pw) tokens in t-major order and
      P = pt*ph*pw*C values per token, ordered (pt, ph, pw, C).

  Raises:
    ValueError: when the input is not 5-D or a dimension does not divide.
  """
  if x_bthwc.ndim != 5:
    raise ValueError(
        f"patchify needs a latent of shape (B, T, H, W, C); got shape {x_bthwc.shape}. "
        "Add a frame axis of size 1 for images."
    )
  b, t, h, w, c = x_bthwc.shape
  gt, gh, gw = patch_grid((t, h, w), patch)
  pt, ph, pw = patch
  x = x_bthwc.reshape(b, gt, pt, gh, ph, gw, pw, c)
  x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(b, gt * gh * gw, pt * ph * pw * c)


def unpatchify(x_blp: jnp.ndarray, grid: Grid, patch: Patch, channels: int) -> jnp.ndarray:
  """Inverse of `patchify`: puts spacetime patches back into a latent.

  Args:
    x_blp: tokens (B, L, P) in t-major order.
    grid: token grid (gt, gh, gw) with gt*gh*gw == L.
    patch: (pt, ph, pw).
    channels: latent channels C, with pt*ph*pw*C == P.

  Returns:
    x_bthwc: (B, gt*pt, gh*ph, gw*pw, C).

  Raises:
    ValueError: when L or P do not match the grid, patch and channels.
  """
  _check_patch(patch)
  if x_blp.ndim != 3:
    raise ValueError(f"unpatchify needs tokens of shape (B, L, P); got shape {x_blp.shape}.")
  b, length, p = x_blp.shape
  gt, gh, gw = grid
  pt, ph, pw = patch
  if gt * gh * gw != length:
    raise ValueError(
        f"grid {tuple(grid)} holds {gt * gh * gw} tokens but the input has L={length}; "
        "pass the grid returned by patch_grid for the latent that was patchified."
    )
  if pt * ph * pw * channels != p:
    raise ValueError(
        f"patch {tuple(patch)} with {channels} channels makes P={pt * ph * pw * channels} values "
        f"per token but the input has P={p}; pass the patch size and channels used by patchify."
    )
  x = x_blp.reshape(b, gt, gh, gw, pt, ph, pw, channels)
  x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
  return x.reshape(b, gt * pt, gh * ph, gw * pw, channels)


def grid_positions(grid: Grid) -> np.ndarray:
  """Integer (t, h, w) patch coordinates of every token, in `patchify`'s t-major order.

  Returned as numpy so that it is a compile-time constant under jit.

  Args:
    grid: token grid (gt, gh, gw).

  Returns:
    int32 (L, 3) with L = gt*gh*gw.
  """
  if len(grid) != 3 or any(int(g) < 1 for g in grid):
    raise ValueError(f"grid {tuple(grid)} must be three positive integers (gt, gh, gw).")
  coords = np.meshgrid(*(np.arange(g, dtype=np.int32) for g in grid), indexing="ij")
  return np.stack([c.reshape(-1) for c in coords], axis=-1)
