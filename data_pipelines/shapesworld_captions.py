"""The ShapesWorld caption grammar: vocabulary, `format_caption` and its exact inverse.

Words are lower case; the canonical text is what `format_caption` writes:

  caption := objects [", the camera pans " DIR]
  objects := object [motion] {" and " object [motion]}
  object  := "a " [SIZE " "] COLOUR " " SHAPE        SIZE in {small, large}; no word = medium
  motion  := "moving " DIR | "standing still"        DIR in {left, right, up, down}

Either every object carries its own motion (`a red circle moving left and a blue square standing
still`), or only the last one does and it is shared by all (`a blue square and a yellow triangle
moving up`; written when all motions are equal), or none does: the image form, used for 1-frame
clips, where every object is static and the camera does not pan (`a large red circle`).
Object motion words describe motion in the world; "the camera pans <dir>" moves the camera.
"""

import dataclasses

COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("left", "right", "up", "down", "static")
DIRECTIONS = ("left", "right", "up", "down")
SIZES = ("small", "medium", "large")

# Unit screen vectors (x right, y down) of each direction.
DIRECTION_VECTORS = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "static": (0.0, 0.0),
}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up", "static": "static"}


@dataclasses.dataclass(frozen=True)
class CaptionObject:
  """One object as a caption states it."""

  colour: str  # A key of COLOURS.
  shape: str  # One of SHAPES.
  size: str  # One of SIZES ("medium" has no caption word).
  motion: str  # One of MOTIONS, in the world frame.


@dataclasses.dataclass(frozen=True)
class Caption:
  """A parsed caption: what the text claims, in mention order."""

  objects: tuple[CaptionObject, ...]
  camera: str  # "static" or the pan direction (one of DIRECTIONS).


def format_caption(caption: Caption, *, image: bool = False) -> str:
  """Canonical caption text of `caption`; `parse_caption` inverts it exactly.

  Args:
    caption: the objects and camera to describe.
    image: write the image form (no motion words); needs static objects and a static camera.

  Returns:
    the caption string.
  """
  if not caption.objects:
    raise ValueError(f"{caption}: a caption needs at least one object.")
  phrases = []
  for o in caption.objects:
    words = ["a"] + ([o.size] if o.size != "medium" else []) + [o.colour, o.shape]
    phrases.append(" ".join(words))
  if image:
    if caption.camera != "static" or any(o.motion != "static" for o in caption.objects):
      raise ValueError(
          f"{caption}: the image form cannot state motion; images have static objects and a"
          " static camera. Use image=False for videos.")
    return " and ".join(phrases)

  def motion(m):
    return "standing still" if m == "static" else f"moving {m}"

  motions = [o.motion for o in caption.objects]
  if len(motions) > 1 and len(set(motions)) == 1:
    text = " and ".join(phrases) + " " + motion(motions[0])
  else:
    text = " and ".join(f"{p} {motion(m)}" for p, m in zip(phrases, motions))
  if caption.camera != "static":
    text += f", the camera pans {caption.camera}"
  return text


class _Parser:
  """Recursive-descent parser over the caption's words (see the module docstring grammar)."""

  def __init__(self, text: str):
    if not isinstance(text, str):
      raise ValueError(f"caption {text!r} has type {type(text).__name__}; pass a str.")
    self.text = text
    self.words = text.strip().lower().rstrip(".").replace(",", " , ").split()
    self.pos = 0

  def fail(self, expected: str):
    got = repr(self.words[self.pos]) if self.pos < len(self.words) else "the end of the text"
    raise ValueError(
        f"caption {self.text!r} is outside the ShapesWorld grammar: expected {expected} at word"
        f" {self.pos + 1}, got {got}. Captions look like 'a large red circle moving left' or"
        " 'a blue square and a yellow triangle moving up, the camera pans right'.")

  def peek(self):
    return self.words[self.pos] if self.pos < len(self.words) else None

  def take(self, options, expected):
    word = self.peek()
    if word not in options:
      self.fail(expected)
    self.pos += 1
    return word

  def motion(self):
    if self.peek() == "moving":
      self.pos += 1
      return self.take(DIRECTIONS, f"a direction {DIRECTIONS}")
    if self.peek() == "standing":
      self.pos += 1
      self.take(("still",), "'still'")
      return "static"
    return None

  def parse(self) -> Caption:
    entries = []
    while True:
      self.take(("a",), "'a'")
      size = "medium"
      if self.peek() in ("small", "large"):
        size = self.take(("small", "large"), "a size")
      colour = self.take(tuple(COLOURS), f"a colour {tuple(COLOURS)}")
      shape = self.take(SHAPES, f"a shape {SHAPES}")
      entries.append((colour, shape, size, self.motion()))
      if self.peek() != "and":
        break
      self.pos += 1
    motions = [e[3] for e in entries]
    if all(m is None for m in motions):
      motions = ["static"] * len(entries)
      form = "image"
    elif all(m is not None for m in motions):
      form = "each"
    elif all(m is None for m in motions[:-1]):
      motions = [motions[-1]] * len(entries)
      form = "shared"
    else:
      raise ValueError(
          f"caption {self.text!r}: give every object its own motion ('moving <dir>' or"
          " 'standing still'), or give one motion after the last object to share it.")
    camera = "static"
    if self.peek() == ",":
      if form == "image":
        self.fail("no camera clause in an image caption (add object motions for a video)")
      self.pos += 1
      for word in ("the", "camera", "pans"):
        self.take((word,), repr(word))
      camera = self.take(DIRECTIONS, f"a pan direction {DIRECTIONS}")
    if self.peek() is not None:
      self.fail("'and', ', the camera pans <dir>' or the end of the caption")
    return Caption(
        objects=tuple(CaptionObject(colour=c, shape=s, size=z, motion=m)
                      for (c, s, z, _), m in zip(entries, motions)),
        camera=camera)


def parse_caption(caption: str) -> Caption:
  """Parses a ShapesWorld caption (case-insensitive, trailing period allowed).

  Args:
    caption: text in the grammar of this module's docstring.

  Returns:
    Caption with objects in mention order; objects without motion words (image form) are
    "static", and the camera is "static" unless a pan clause is present.

  Raises:
    ValueError: naming the first word outside the grammar.
  """
  return _Parser(caption).parse()
