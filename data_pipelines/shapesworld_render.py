"""ShapesWorld drawing: bouncing boxes, anti-aliased shapes and the world-fixed background.

Pure numpy functions of explicit arguments (no randomness), vectorised over frames. Pixel
convention: x grows to the right, y downwards, pixel (row i, column j) covers [j, j+1) x [i, i+1),
so its centre is (j + 0.5, i + 0.5).
"""

import numpy as np


def bounce(start, velocity, t, room):
  """Positions in [0, room] of a point moving at constant velocity between two walls.

  Folding the free path p0 + v t into [0, room] with a triangle wave is exactly an elastic bounce.

  Args:
    start: start coordinate in [0, room].
    velocity: px/frame.
    t: float (T,) frame times.
    room: wall distance.

  Returns:
    float (T,) coordinates.
  """
  if room <= 0:
    return np.zeros_like(t)
  u = np.mod(start + velocity * t, 2 * room)
  return room - np.abs(u - room)


def box_corners(start, velocity, size_px, extent, frames):
  """float64 (T, 2) top-left corners (x, y) of a bouncing box of side size_px in extent (W, H)."""
  t = np.arange(frames, dtype=np.float64)
  return np.stack([bounce(start[a], velocity[a], t, extent[a] - size_px) for a in range(2)], 1)


def coverage(shape, dx_tw, dy_th, size_px):
  """Anti-aliased coverage in [0, 1] of one object, float32 (T, h, w) over a pixel window.

  Coverage is clip(0.5 - d, 0, 1) for a signed distance d (px, negative inside): a one-pixel
  linear ramp across the edge, i.e. light anti-aliasing with hard-looking edges.

  Args:
    shape: "circle", "square" or "triangle" (apex up).
    dx_tw: float32 (T, w) x offsets of the window's pixel centres from the object's centre.
    dy_th: float32 (T, h) y offsets of the window's pixel centres from the object's centre.
    size_px: bounding-box side in px.

  Returns:
    float32 (T, h, w) coverage.
  """
  dx = dx_tw[:, None, :]
  dy = dy_th[:, :, None]
  half = np.float32(size_px / 2)
  if shape == "circle":
    d = np.sqrt(dx * dx + dy * dy) - half
  elif shape == "square":
    d = np.maximum(np.abs(dx) - half, np.abs(dy) - half)
  else:
    # Upward isosceles triangle filling its box: apex at the top centre, base at the bottom.
    # Side normals are (+-2, -1)/sqrt(5); the sides meet the base at the box's bottom corners.
    inv_sqrt5 = np.float32(1 / np.sqrt(5))
    side = (2 * inv_sqrt5) * np.abs(dx) - inv_sqrt5 * (dy + half)
    d = np.maximum(side, dy - half)
  return np.clip(np.float32(0.5) - d, 0.0, 1.0)


def paint_object(video_thwc, shape, centres_t2, size_px, colour):
  """Paints one object over a video, in place, in every frame (later calls paint in front).

  Only a window of ceil(size) + 3 pixels around the object is touched in each frame, which keeps
  large frames cheap. Objects never leave the frame, so the window always fits.

  Args:
    video_thwc: uint8 (T, H, W, 3) video, modified in place.
    shape: "circle", "square" or "triangle".
    centres_t2: float (T, 2) bounding-box centres (x, y) in px.
    size_px: bounding-box side in px.
    colour: RGB triple.
  """
  frames, height, width, _ = video_thwc.shape
  win_x = min(width, int(np.ceil(size_px)) + 3)
  win_y = min(height, int(np.ceil(size_px)) + 3)
  corner = centres_t2 - np.float32(size_px / 2 + 0.5)
  x0 = np.clip(np.floor(corner[:, 0]).astype(np.int64), 0, width - win_x)
  y0 = np.clip(np.floor(corner[:, 1]).astype(np.int64), 0, height - win_y)
  dx = (x0[:, None] + np.arange(win_x) + 0.5 - centres_t2[:, :1]).astype(np.float32)  # (T, w)
  dy = (y0[:, None] + np.arange(win_y) + 0.5 - centres_t2[:, 1:]).astype(np.float32)  # (T, h)
  alpha_thw1 = coverage(shape, dx, dy, size_px)[..., None]
  colour = np.asarray(colour, np.float32)
  for t in range(frames):
    window = video_thwc[t, y0[t]:y0[t] + win_y, x0[t]:x0[t] + win_x]
    under = window.astype(np.float32)
    window[...] = (under + alpha_thw1[t] * (colour - under) + np.float32(0.5)).astype(np.uint8)


def background(frames, height, width, texture, camera_velocity, base_rgb) -> np.ndarray:
  """Dark base colour plus a faint grey texture fixed to the world, so it moves with pans.

  Each sinusoid separates, sin(a + b) = sin a cos b + cos a sin b with a = a(t, x), b = b(t, y),
  so the whole texture is one batched matmul (T, H, 2K) @ (T, 2K, W); without a pan one frame is
  computed and broadcast.

  Args:
    frames: T.
    height: H.
    width: W.
    texture: float (K, 4) sinusoids: wavenumber kx, wavenumber ky (rad/px), phase, amplitude
      (uint8 levels); the amplitudes must sum to at most min(base_rgb) to stay in range.
    camera_velocity: (vx, vy) px/frame; the texture at screen point p, frame t, is the world's
      at p + t * velocity, so it drifts opposite to the pan on screen.
    base_rgb: background colour.

  Returns:
    uint8 (T, H, W, 3) video.
  """
  moving = camera_velocity[0] != 0 or camera_velocity[1] != 0
  t = np.arange(frames if moving else 1, dtype=np.float64)
  kx, ky, phase, amplitude = (texture[:, j] for j in range(4))
  xs = np.arange(width) + 0.5 + camera_velocity[0] * t[:, None]  # (T, W)
  ys = np.arange(height) + 0.5 + camera_velocity[1] * t[:, None]  # (T, H)
  a = xs[:, :, None] * kx + phase  # (T, W, K)
  b = ys[:, :, None] * ky  # (T, H, K)
  x_part = np.concatenate([amplitude * np.sin(a), amplitude * np.cos(a)], axis=2)
  y_part = np.concatenate([np.cos(b), np.sin(b)], axis=2)
  grey_thw = np.matmul(y_part.astype(np.float32), x_part.astype(np.float32).transpose(0, 2, 1))
  base = np.asarray(base_rgb, np.float32) + np.float32(0.5)  # + 0.5: round on the cast.
  video = np.empty((frames, height, width, 3), np.uint8)
  video[...] = (grey_thw[..., None] + base).astype(np.uint8)
  return video
