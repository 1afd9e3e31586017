"""Stage 5, prompt generation: spatial (point, box, mask), textual and combined prompts for one layer.

Every layer gets each prompt type at both granularities:

| type | coarse | fine |
|---|---|---|
| point | 1 positive point deep inside the visible mask | ``points_per_prompt`` positives spread over it + 1-2 negatives just outside |
| box | the tight box enlarged by about 10% (clipped to the image) | the tight box of the visible mask |
| mask | the visible mask dilated and made blocky, like a rough brush stroke | the visible mask |
| text | category + colour | caption + position (template: category + colour + size + position) |
| text+box | coarse text + coarse box | fine text + fine box |
| text+point | coarse text + coarse point | fine text + fine points |

A background row's prompts refer to the entity removed: the same spatial prompts, and text "the scene without ...".

Fine text: when the entity carries a caption (``Entity.caption``, written by the neural backend's captioner), the
sanitised caption followed by the position phrase (a crop's caption cannot know where the crop lies in the
image): "a red mug with a handle, on the left"; otherwise, or when the caption is unusable, the template. Captions
are model output, so they are sanitised first (:func:`sanitize_caption`): special tokens (``[SEP]``,
``[unused3]``, ``</s>``, ...) and WordPiece ``##`` markers removed, accents folded and every other non-ASCII or
non-printable character dropped, whitespace and repeated words collapsed, at most :data:`MAX_CAPTION_WORDS`
words and within :data:`MAX_TEXT_CHARS`; one with no word of two letters or more is unusable. The coarse text
always comes from the template (the detector's category word and the colour), so every layer keeps a text prompt
grounded in its category.

Coordinates are pixels of the stored image, x right, y down; boxes are half-open ``[x0, y0, x1, y1]``.
"""

from __future__ import annotations

import re
import unicodedata

import cv2
import numpy as np

from reflade.engine.config import EngineConfig
from reflade.engine.schema import GRANULARITIES, KINDS, decode_mask, encode_png
from reflade.engine.types import Entity, mask_box

__all__ = [
    "PROMPT_TYPES",
    "MAX_CAPTION_WORDS",
    "MAX_TEXT_CHARS",
    "caption_text",
    "make_prompts",
    "sanitize_caption",
    "text_for",
    "encode_mask_png",
    "decode_mask_png",
]

PROMPT_TYPES = ("point", "box", "mask", "text", "text+box", "text+point")
"""The prompt types every layer gets, each at both granularities of ``schema.GRANULARITIES``."""
MAX_TEXT_CHARS = 120
"""Longest referring expression, characters."""
MAX_CAPTION_WORDS = 16
"""Most words of a caption kept for a text prompt."""

# Special tokens of BERT/BLIP ([CLS], [SEP], [PAD], [DEC], [unused12]) and of SentencePiece/GPT tokenizers
# (<pad>, </s>, <|endoftext|>) that a decoder may leave in its text.
_SPECIAL_TOKEN = re.compile(r"\[[A-Za-z][A-Za-z0-9_]*\]|<\|?/?[A-Za-z][A-Za-z0-9_]*\|?>")
_USABLE_WORD = re.compile(r"[A-Za-z]{2,}")
_EDGE_PUNCTUATION = " .,;:!?-_'\"/\\|()[]{}<>*&^%$#@~`+="

# Per-side enlargement of the coarse box, as a fraction of the tight box's side (about 10% in all).
_COARSE_BOX_PAD = (0.03, 0.07)
# The coarse point is drawn among pixels at least this fraction of the deepest distance from the mask's edge.
_COARSE_POINT_DEPTH = 0.8
# Negative points lie this far outside the visible mask: at least 2 px, at most ~4% of the image's longer side.
_NEGATIVE_RING = (2.0, 0.04)
# The coarse mask is the visible mask dilated by ~2% of its box and quantised to blocks of ~1/16 of the box.
_COARSE_MASK_DILATE = 0.02
_COARSE_MASK_BLOCKS = 16

# Position words as stage 2 writes them ("left", "top-left", "left top", "center middle"), sorted into two axes.
_HORIZONTAL = {"left": "left", "right": "right", "center": "", "centre": "", "middle": ""}
_VERTICAL = {
    "top": "top",
    "upper": "top",
    "bottom": "bottom",
    "lower": "bottom",
    "center": "",
    "centre": "",
    "middle": "",
}
_SIZE_WORDS = {"small": "small", "medium": "medium-sized", "large": "large", "big": "big", "tiny": "tiny"}


def make_prompts(
    entity: Entity,
    visible_mask: np.ndarray,
    image_size: tuple[int, int],
    rng: np.random.Generator,
    cfg: EngineConfig | None = None,
    kind: str = "foreground",
) -> list[dict]:
    """All prompts of one layer (see the module's table), deterministic for a given ``rng`` state.

    Args:
        entity: the entity the layer is about (its label and attributes make the text).
        visible_mask: HxW bool, the ENTITY's visible pixels, for both kinds (for a background row pass the removed
            entity's mask, not the row's ``visible_mask`` column, which is its complement).
        image_size: (height, width) of the stored image, pixels (``image.shape[:2]``); must match the mask.
        rng: the source of randomness (seed it from the sample id for reproducible rows).
        cfg: engine configuration (``points_per_prompt``).
        kind: ``foreground`` or ``background``.

    Returns:
        A list of dicts with exactly the keys ``type``, ``granularity``, ``points`` (list of ``[x, y, label]``
        ints, label 1 positive / 0 negative), ``box`` (``[x0, y0, x1, y1]`` ints, half-open, or None), ``mask``
        (PNG bytes, 1 channel 0/255, or None), ``text`` (str or None).

    Raises:
        ValueError: unknown kind, a size that does not match the mask, an empty mask, or a mask that does not
            overlap the entity's own mask (the complement passed by mistake).
    """
    cfg = cfg or EngineConfig()
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    mask = np.asarray(visible_mask).astype(bool)
    height, width = int(image_size[0]), int(image_size[1])
    if mask.shape != (height, width):
        raise ValueError(
            f"visible_mask is {mask.shape} but image_size (height, width) is {tuple(image_size)}"
        )
    area = int(mask.sum())
    if area == 0:
        raise ValueError(f"entity {entity.entity_id} has an empty visible mask: no prompt can refer to it")
    own = np.asarray(entity.mask).astype(bool) if entity.mask is not None else None
    if own is not None and own.shape == mask.shape and own.any() and (own & mask).sum() < 0.5 * own.sum():
        raise ValueError(
            f"visible_mask overlaps less than half of entity {entity.entity_id}'s mask: pass the "
            "entity's visible mask (for a background row too), not its complement"
        )

    depth = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    coarse_point = _coarse_point(depth, rng)
    fine_points = _fine_points(mask, depth, cfg.points_per_prompt, rng) + _negative_points(mask, rng)
    fine_box = mask_box(mask)
    coarse_box = _enlarge_box(fine_box, width, height, rng)
    text_fine = text_for(entity, kind, granularity="fine")  # the caption's, when the entity has a usable one
    text_coarse = text_for(entity, kind, granularity="coarse")

    def prompt(type_, granularity, points=(), box=None, mask_png=None, text=None) -> dict:
        return {
            "type": type_,
            "granularity": granularity,
            "points": [list(p) for p in points],
            "box": list(box) if box is not None else None,
            "mask": mask_png,
            "text": text,
        }

    return [
        prompt("point", "coarse", points=[coarse_point]),
        prompt("point", "fine", points=fine_points),
        prompt("box", "coarse", box=coarse_box),
        prompt("box", "fine", box=fine_box),
        prompt("mask", "coarse", mask_png=encode_mask_png(_coarse_mask(mask, fine_box))),
        prompt("mask", "fine", mask_png=encode_mask_png(mask)),
        prompt("text", "coarse", text=text_coarse),
        prompt("text", "fine", text=text_fine),
        prompt("text+box", "coarse", box=coarse_box, text=text_coarse),
        prompt("text+box", "fine", box=fine_box, text=text_fine),
        prompt("text+point", "coarse", points=[coarse_point], text=text_coarse),
        prompt("text+point", "fine", points=fine_points, text=text_fine),
    ]


def text_for(entity: Entity, kind: str = "foreground", granularity: str = "fine") -> str:
    """A referring expression for the entity, at most 120 characters.

    Fine: the entity's sanitised caption and its position (:func:`caption_text`) when it has a usable
    caption; otherwise, and always for coarse, the template: fine = size, colour, category and position
    (``"the small red round object on the left"``), coarse = colour and category (``"the red round object"``).
    Attributes that are missing are left out. A background layer is "the scene without" the entity.

    Args:
        entity: uses ``label``, ``attributes`` (``color``, ``size``, ``position``; any may be absent) and
            ``caption`` (may be None).
        kind: ``foreground`` or ``background``.
        granularity: ``fine`` or ``coarse``.

    Raises:
        ValueError: unknown kind or granularity.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "fine":
        captioned = caption_text(entity, kind)
        if captioned is not None:
            return captioned
    attrs = entity.attributes or {}
    label = _words(entity.label) or "object"
    color = _words(attrs.get("color"))
    size = _SIZE_WORDS.get(_words(attrs.get("size")), _words(attrs.get("size")))
    position = _position_phrase(_words(attrs.get("position")))
    prefix = "the scene without " if kind == "background" else ""

    # Parts are dropped, least informative first, until the phrase fits; the label is cut last.
    parts = (
        {"size": size, "color": color, "position": position} if granularity == "fine" else {"color": color}
    )
    for drop in (None, "size", "position", "color"):
        if drop:
            parts[drop] = ""
        noun = " ".join(w for w in (parts.get("size"), parts.get("color"), label) if w)
        text = " ".join(w for w in (prefix + "the", noun, parts.get("position")) if w)
        if len(text) <= MAX_TEXT_CHARS:
            return text
    return text[:MAX_TEXT_CHARS].rsplit(" ", 1)[0]


def caption_text(entity: Entity, kind: str = "foreground") -> str | None:
    """The fine referring expression made from the entity's caption: the sanitised caption, then the
    position phrase after a comma (``"a red mug with a handle, on the left"``); "the scene without ..." for a
    background layer. At most :data:`MAX_TEXT_CHARS` characters (the position is left out when it does not fit).

    Args:
        entity: uses ``caption`` and ``attributes["position"]``.
        kind: ``foreground`` or ``background``.

    Returns:
        The text, or None when the entity has no caption or an unusable one (see :func:`sanitize_caption`).

    Raises:
        ValueError: unknown kind.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not entity.caption:
        return None
    prefix = "the scene without " if kind == "background" else ""
    position = _position_phrase(_words((entity.attributes or {}).get("position")))
    for suffix in (f", {position}", "") if position else ("",):
        caption = sanitize_caption(entity.caption, max_chars=MAX_TEXT_CHARS - len(prefix) - len(suffix))
        if caption:
            if suffix and position in caption.lower():  # the captioner said where it is already
                suffix = ""
            return prefix + caption + suffix
    return None


def sanitize_caption(
    text: str | None, *, max_words: int = MAX_CAPTION_WORDS, max_chars: int = MAX_TEXT_CHARS
) -> str:
    """A captioner's output made safe for a text prompt, or "" when nothing usable is left.

    Special tokens (``[SEP]``, ``[unused0]``, ``<pad>``, ``</s>``, ``<|endoftext|>``) are removed, WordPiece
    continuations (``##``) joined to the word before (dropped when they come first), accents folded (NFKD)
    and every other non-ASCII or non-printable character dropped (control characters become spaces),
    whitespace collapsed, runs of the same word collapsed to one, punctuation stripped from both ends; then at
    most ``max_words`` words, and whole words dropped from the end until it fits ``max_chars``.

    Args:
        text: the decoded caption (may be None or empty).
        max_words: most words kept.
        max_chars: most characters kept.

    Returns:
        The caption, or "" when it has no word of at least two ASCII letters (junk or empty: use the template).
    """
    if not text:
        return ""
    t = unicodedata.normalize("NFKD", str(text))
    t = _SPECIAL_TOKEN.sub(" ", t)
    t = re.sub(r"^(?:\s*##\S*)+", "", t)  # a continuation with no word before it is a fragment: dropped
    t = re.sub(r"\s*##", "", t)
    t = re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", " ", t)
    t = t.encode("ascii", "ignore").decode("ascii")
    words: list[str] = []
    for w in " ".join(t.split()).strip(_EDGE_PUNCTUATION).split():
        if not words or w.lower() != words[-1].lower():
            words.append(w)
    words = words[: max(0, max_words)]
    while words and len(" ".join(words).strip(_EDGE_PUNCTUATION)) > max_chars:
        words.pop()
    out = " ".join(words).strip(_EDGE_PUNCTUATION)
    return out if _USABLE_WORD.search(out) else ""


def encode_mask_png(mask: np.ndarray) -> bytes:
    """HxW bool (non-zero = inside) -> PNG bytes, 1 channel, 0/255.

    Raises:
        ValueError: a mask that is not 2-D.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be HxW, got shape {m.shape}")
    return encode_png(m.astype(bool))


def decode_mask_png(data: bytes) -> np.ndarray:
    """PNG bytes (1 channel, 0/255) -> HxW bool, read as the schema reads masks (value >= 128).

    Raises:
        ValueError: bytes that are not a readable PNG.
    """
    if bytes(data[:8]) != b"\x89PNG\r\n\x1a\n":
        raise ValueError("mask is not a PNG (wrong signature)")
    try:
        return decode_mask(bytes(data))
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"mask is not a readable PNG: {exc}") from exc


def _words(value) -> str:
    if value is None:
        return ""
    return re.sub(r"\s+", " ", re.sub(r"[_\-]+", " ", str(value))).strip().lower()


def _position_phrase(position: str) -> str:
    """ "left" -> "on the left"; "left top" or "top left" -> "at the top left"; "center middle" -> "in the center"."""
    words = position.split()
    if not words:
        return ""
    if not all(w in _HORIZONTAL or w in _VERTICAL for w in words):
        return f"at the {position}"  # free text (a captioner's): keep it as written
    horiz = next((_HORIZONTAL[w] for w in words if _HORIZONTAL.get(w)), "")
    vert = next((_VERTICAL[w] for w in words if _VERTICAL.get(w)), "")
    if horiz and vert:
        return f"at the {vert} {horiz}"
    if vert:
        return f"at the {vert}"
    if horiz:
        return f"on the {horiz}"
    return "in the center"


def _coarse_point(depth: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int]:
    ys, xs = np.nonzero(depth >= _COARSE_POINT_DEPTH * depth.max())
    i = int(rng.integers(len(ys)))
    return int(xs[i]), int(ys[i]), 1


def _fine_points(
    mask: np.ndarray, depth: np.ndarray, n: int, rng: np.random.Generator
) -> list[tuple[int, int, int]]:
    """``n`` positive points spread over the visible mask (farthest-point sampling), off its edge when possible."""
    if n <= 0:
        return []
    inner = depth >= min(2.0, float(depth.max()))
    ys, xs = np.nonzero(inner)
    if len(ys) > 4096:  # a random subset keeps farthest-point sampling cheap on big masks
        keep = rng.choice(len(ys), 4096, replace=False)
        keep.sort()
        ys, xs = ys[keep], xs[keep]
    chosen = [int(rng.integers(len(ys)))]
    d2 = (xs - xs[chosen[0]]) ** 2 + (ys - ys[chosen[0]]) ** 2
    for _ in range(1, min(n, len(ys))):
        nxt = int(np.argmax(d2))
        chosen.append(nxt)
        d2 = np.minimum(d2, (xs - xs[nxt]) ** 2 + (ys - ys[nxt]) ** 2)
    points = [(int(xs[i]), int(ys[i]), 1) for i in chosen]
    while len(points) < n:  # fewer candidate pixels than points: repeat (a valid, if redundant, prompt)
        points.append(points[len(points) % len(chosen)])
    return points


def _negative_points(mask: np.ndarray, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """1-2 negative points just outside the visible mask (none when the mask covers the whole image)."""
    outside = ~mask
    if not outside.any():
        return []
    dist = cv2.distanceTransform(outside.astype(np.uint8), cv2.DIST_L2, 5)
    ring_max = max(_NEGATIVE_RING[0] + 1, _NEGATIVE_RING[1] * max(mask.shape))
    ys, xs = np.nonzero((dist >= _NEGATIVE_RING[0]) & (dist <= ring_max))
    if len(ys) == 0:
        ys, xs = np.nonzero(outside)
    count = min(int(rng.integers(1, 3)), len(ys))
    picks = rng.choice(len(ys), count, replace=False)
    return [(int(xs[i]), int(ys[i]), 0) for i in picks]


def _enlarge_box(box, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    pads = rng.uniform(*_COARSE_BOX_PAD, size=4) * np.array([bw, bh, bw, bh])
    pads = np.maximum(1, np.rint(pads)).astype(int)
    return (
        max(0, x0 - int(pads[0])),
        max(0, y0 - int(pads[1])),
        min(width, x1 + int(pads[2])),
        min(height, y1 + int(pads[3])),
    )


def _coarse_mask(mask: np.ndarray, box) -> np.ndarray:
    """A rough version of the mask: dilated, then quantised to blocks (what a quick brush stroke looks like)."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0)
    r = max(1, round(_COARSE_MASK_DILATE * side))
    dilated = 255 * cv2.dilate(
        mask.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    )
    block = max(1, side // _COARSE_MASK_BLOCKS)
    h, w = mask.shape
    small = cv2.resize(
        dilated, (max(1, -(-w // block)), max(1, -(-h // block))), interpolation=cv2.INTER_AREA
    )
    blocky = cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
    return (blocky > 0) | mask
