"""ToyScars: a procedural SynthScars look-alike, small enough for a tiny model to learn on a CPU.

    legion make-toy-data --output-dir data/toyscars --num-train 400 --num-test 100 --seed 0 --size 128

Each image shows one of the 4 SynthScars content types (human, animal, object, scene) drawn from
gradients, value-noise textures and shapes, lit by a visible light source (sun or lamp) with
consistent soft shadows. A fake image gets 1-2 planted artifacts of one category:

- structure: a part twisted into a swirl, or a duplicated part;
- distortion: a blurred, noisy, or oddly tinted patch;
- physics: a shadow that points toward the light, or a glow with no light source.

Each artifact has one polygon covering 8-35% of the image. A fake image also carries a faint
generator trace over the whole frame: an 8-px periodic grid of +-`generator_trace` grey levels
(default 10), like the one latent-diffusion decoders leave at their 8x upsampling. Real detectors
learn such global fingerprints; without one, telling a fake from its paired clean render would rest
on the local artifacts alone, which a frozen random tiny CLIP cannot see (measured with the tiny
detector, 400/100 pairs: 56.5% test accuracy without the trace, 94% with it). Apart from that trace, pixels
outside the artifact polygons equal the clean render. Captions follow the exact SynthScars template
(PREFIX + summary + MARKER + sentence:explanation...) with a small closed vocabulary; phrases and
explanations name the artifact and where it is ("upper left", ...). Layout:

    DIR/{train,test}/images/<split>_NNNNN.png
    DIR/{train,test}/annotations/<split>.json          (SynthScars format + content_type, artifact_category)
    DIR/detection/{train,test}/toyscars/0_real/...    clean renders  (UniversalFakeDetect layout)
    DIR/detection/{train,test}/toyscars/1_fake/...    the artifact images
    DIR/toyscars.json                                  generator settings and counts

Every image is a pure function of (seed, split, index), so any number of workers gives the same files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from legion.cli_args import add_output_dir_argument, check_output_dir_argument
from legion.data.synthscars import MARKER, PREFIX, rasterize_polygons
from legion.errors import OptionError
from legion.utils.io import atomic_write_bytes, atomic_write_text

CONTENT_TYPES = ("human", "animal", "object", "scene")
CATEGORIES = ("structure", "distortion", "physics")
KINDS = {"structure": ("twisted", "extra"), "distortion": ("blurred", "noisy", "tinted"), "physics": ("shadow", "glow")}
PARTS = {
    "human": ("head", "arm", "leg", "body"),
    "animal": ("head", "body", "tail", "leg"),
    "object": ("neck", "body", "handle", "base"),
    "scene": ("house", "roof", "tree", "mountain"),
}
TINTS = {"purple": (1.35, 0.55, 1.45), "green": (0.55, 1.45, 0.6), "cyan": (0.5, 1.3, 1.5), "orange": (1.5, 1.0, 0.35)}
LOCATIONS = (
    ("in the upper left", "at the top", "in the upper right"),
    ("on the left", "in the center", "on the right"),
    ("in the lower left", "at the bottom", "in the lower right"),
)
SUBJECTS = {
    "human": "A person stands",
    "animal": "A dog stands",
    "object": "A vase sits",
    "scene": "A small house stands",
}
SETTINGS = {
    "human": ("in a sunny field", "on a sandy beach", "in a green park"),
    "animal": ("in a sunny field", "on a sandy beach", "in a green park"),
    "object": ("on a wooden table", "on a dark table", "on a pale table"),
    "scene": ("below the mountains", "under a clear sky", "near a tall tree"),
}
GROUNDS = {
    "in a sunny field": (150, 170, 70),
    "on a sandy beach": (215, 195, 140),
    "in a green park": (70, 140, 60),
    "on a wooden table": (150, 100, 55),
    "on a dark table": (80, 55, 40),
    "on a pale table": (200, 180, 150),
}
MIN_AREA, MAX_AREA = 0.08, 0.35


# --- words ----------------------------------------------------------------------------------
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(kind: str, part: str | None, tint: str | None) -> str:
    """'twisted arm', 'extra head', 'blurred patch', 'purple patch', 'wrong shadow', 'strange glow'."""
    if kind in ("twisted", "extra"):
        return f"{kind} {part}"
    if kind == "tinted":
        return f"{tint} patch"
    return {"blurred": "blurred patch", "noisy": "noisy patch", "shadow": "wrong shadow", "glow": "strange glow"}[kind]


def _explanation(kind: str, part: str | None, tint: str | None, light: str, where: str) -> str:
    return {
        "twisted": f"The {part} {where} is twisted into an impossible swirl.",
        "extra": f"A second {part} appears {where} where only one should be.",
        "blurred": f"The area {where} is blurred and has lost its texture.",
        "noisy": f"The area {where} is covered in strong grainy noise.",
        "tinted": f"The area {where} has an unnatural {tint} tint.",
        "shadow": f"The shadow {where} points toward the {light}, which is impossible.",
        "glow": f"The area {where} glows brightly with no light source nearby.",
    }[kind]


def _sentence(kind, part, tint, where) -> str:
    return f"The {_noun_phrase(kind, part, tint)} {where}"


def _caption(content: str, setting: str, artifacts: list[Artifact], light: str) -> str:
    mentions = [f"{_article(n)} {n} {a.where}" for a in artifacts for n in [_noun_phrase(a.kind, a.part, a.tint)]]
    summary = f"{SUBJECTS[content]} {setting}, with {' and '.join(mentions)}."
    details = "".join(f"{a.sentence}:{_explanation(a.kind, a.part, a.tint, light, a.where)}" for a in artifacts)
    return PREFIX + summary + MARKER + details


def caption_corpus() -> list[str]:
    """Every phrase, explanation and summary fragment the generator can emit (for tokenizers)."""
    texts = [PREFIX, MARKER.strip()]
    wheres = [w for row in LOCATIONS for w in row]
    for content in CONTENT_TYPES:
        for setting in SETTINGS[content]:
            texts.append(f"{SUBJECTS[content]} {setting}, with")
        for category in CATEGORIES:
            for kind in KINDS[category]:
                parts = PARTS[content] if category == "structure" else [None]
                tints = list(TINTS) if kind == "tinted" else [None]
                for part in parts:
                    for tint in tints:
                        for light in ("sun", "lamp"):
                            for where in wheres:
                                noun = _noun_phrase(kind, part, tint)
                                texts.append(f"{_article(noun)} {noun} {where} and")
                                texts.append(
                                    _sentence(kind, part, tint, where)
                                    + ":"
                                    + _explanation(kind, part, tint, light, where)
                                )
    return list(dict.fromkeys(texts))


# --- drawing helpers (float32 images in 0..255) -----------------------------------------------
def _value_noise(rng, h, w, cells, octaves=3) -> np.ndarray:
    out = np.zeros((h, w), np.float32)
    amp, total = 1.0, 0.0
    for octave in range(octaves):
        n = cells * 2**octave
        grid = rng.uniform(-1, 1, (n + 1, n + 1)).astype(np.float32)
        out += amp * cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
        total += amp
        amp *= 0.5
    return out / total


def _gradient(h, w, top, bottom) -> np.ndarray:
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    return np.broadcast_to((1 - t) * np.float32(top) + t * np.float32(bottom), (h, w, 3)).copy()


def _alpha(shape, draw) -> np.ndarray:
    """Anti-aliased coverage in [0,1] of shapes drawn by `draw(canvas)` with colour 255."""
    canvas = np.zeros(shape[:2], np.uint8)
    draw(canvas)
    return canvas.astype(np.float32)[:, :, None] / 255.0


def _paint(img, alpha, colour, texture=None, strength=0.0):
    fill = np.float32(colour)[None, None, :]
    if texture is not None:
        fill = fill * (1 + strength * texture[:, :, None])
    img *= 1 - alpha
    img += alpha * fill


def _pts(points, scale=8):
    return [np.round(np.asarray(points, np.float64) * scale).astype(np.int32).reshape(-1, 1, 2)]


def _poly(img, points, colour, texture=None, strength=0.0):
    _paint(
        img, _alpha(img.shape, lambda c: cv2.fillPoly(c, _pts(points), 255, cv2.LINE_AA, 3)), colour, texture, strength
    )


def _ellipse(img, cx, cy, rx, ry, colour, texture=None, strength=0.0, angle=0.0):
    def draw(c):
        cv2.ellipse(
            c,
            (round(cx * 8), round(cy * 8)),
            (max(1, round(rx * 8)), max(1, round(ry * 8))),
            angle,
            0,
            360,
            255,
            -1,
            cv2.LINE_AA,
            3,
        )

    _paint(img, _alpha(img.shape, draw), colour, texture, strength)


def _line(img, p, q, width, colour):
    def draw(c):
        cv2.line(
            c,
            (round(p[0] * 8), round(p[1] * 8)),
            (round(q[0] * 8), round(q[1] * 8)),
            255,
            max(1, round(width)),
            cv2.LINE_AA,
            3,
        )

    _paint(img, _alpha(img.shape, draw), colour)


def _ellipse_polygon(cx, cy, rx, ry, n=16, rng=None, wobble=0.0) -> list[float]:
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
    radius = np.ones(n) if rng is None else 1 + wobble * rng.uniform(-1, 1, n)
    return np.stack([cx + rx * radius * np.cos(angles), cy + ry * radius * np.sin(angles)], 1).ravel().tolist()


def _blob_polygon(rng, cx, cy, r, n=20) -> list[float]:
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
    radius = np.ones(n)
    for k in (2, 3, 4):
        radius += rng.uniform(0, 0.12) * np.cos(k * angles + rng.uniform(0, 2 * np.pi))
    return np.stack([cx + r * radius * np.cos(angles), cy + r * radius * np.sin(angles)], 1).ravel().tolist()


def _jitter(rng, colour, amount=25):
    return tuple(float(np.clip(c + rng.uniform(-amount, amount), 0, 255)) for c in colour)


# --- scenes --------------------------------------------------------------------------------
@dataclass
class Scene:
    image: np.ndarray  # float32 [S, S, 3], 0..255, clean render
    parts: dict[str, tuple[float, float, float]]  # part -> (cx, cy, radius)
    light: str  # "sun" | "lamp"
    light_xy: tuple[float, float]
    ground_y: float  # where the subject stands
    subject_x: float
    subject_w: float
    setting: str


def _outdoor_background(rng, s, setting) -> tuple[np.ndarray, float, tuple[float, float]]:
    horizon = s * rng.uniform(0.45, 0.58)
    img = _gradient(s, s, _jitter(rng, (90, 150, 225), 20), _jitter(rng, (190, 215, 240), 15))
    clouds = np.clip(_value_noise(rng, s, s, 3, 2), 0, 1)[:, :, None]
    img += 60 * clouds * (np.arange(s)[:, None, None] < horizon)
    ground = _gradient(s, s, _jitter(rng, GROUNDS[setting], 15), np.float32(_jitter(rng, GROUNDS[setting], 15)) * 0.8)
    texture = _value_noise(rng, s, s, 8, 3)
    ground *= 1 + 0.18 * texture[:, :, None]
    below = np.arange(s, dtype=np.float32)[:, None, None] >= horizon
    img = np.where(below, ground, img)
    side = rng.integers(2)
    sun = (s * (0.12 if side == 0 else 0.88), s * rng.uniform(0.09, 0.18))
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    dist = np.hypot(xx - sun[0], yy - sun[1])
    img += (np.exp(-((dist / (0.25 * s)) ** 2)) * 70)[:, :, None] * (~below)
    _ellipse(img, sun[0], sun[1], 0.07 * s, 0.07 * s, (255, 240, 150))
    return img, horizon, sun


def _shadow(img, light_xy, foot_x, ground_y, width, s, strength=0.55):
    """A soft ground shadow on the side away from the light (what a real render would show)."""
    away = -1.0 if light_xy[0] > foot_x else 1.0
    cx = foot_x + away * 0.5 * width
    alpha = _alpha(
        img.shape,
        lambda c: cv2.ellipse(
            c,
            (round(cx * 8), round(ground_y * 8)),
            (round(0.55 * width * 8), round(0.05 * s * 8)),
            0,
            0,
            360,
            255,
            -1,
            cv2.LINE_AA,
            3,
        ),
    )
    alpha = cv2.GaussianBlur(alpha[:, :, 0], (0, 0), 0.02 * s + 0.5)[:, :, None]
    img *= 1 - strength * alpha


def _render_human(rng, s, setting) -> Scene:
    img, horizon, sun = _outdoor_background(rng, s, setting)
    u = s * rng.uniform(0.55, 0.68)
    feet = min(s * rng.uniform(0.82, 0.92), s - 2)
    cx = s * rng.uniform(0.32, 0.68)
    _shadow(img, sun, cx, feet, 0.5 * u, s)
    skin = _jitter(rng, (225, 180, 140), 30)
    shirt = tuple(rng.uniform(30, 230, 3))
    pants = _jitter(rng, (50, 60, 110), 30)
    hip, shoulder = feet - 0.45 * u, feet - 0.78 * u
    head_r, head_y = 0.12 * u, feet - u + 0.12 * u
    for dx in (-0.07, 0.07):
        _line(img, (cx + dx * u, hip), (cx + dx * 1.6 * u, feet), 0.1 * u, pants)
    _poly(
        img,
        [(cx - 0.15 * u, shoulder), (cx + 0.15 * u, shoulder), (cx + 0.13 * u, hip), (cx - 0.13 * u, hip)],
        shirt,
        _value_noise(rng, s, s, 6, 1),
        0.08,
    )
    spread = rng.uniform(0.25, 0.4)
    for side in (-1, 1):
        _line(
            img, (cx + side * 0.15 * u, shoulder + 0.03 * u), (cx + side * spread * u, hip + 0.05 * u), 0.08 * u, shirt
        )
        _ellipse(img, cx + side * spread * u, hip + 0.07 * u, 0.045 * u, 0.045 * u, skin)
    _ellipse(img, cx, head_y, head_r, head_r * 1.1, skin)
    _ellipse(img, cx, head_y - 0.6 * head_r, head_r * 1.02, head_r * 0.55, _jitter(rng, (70, 45, 30), 30))
    for dx in (-0.4, 0.4):
        _ellipse(img, cx + dx * head_r, head_y + 0.05 * head_r, 0.14 * head_r, 0.14 * head_r, (30, 30, 30))
    arm_side = rng.choice([-1, 1])
    parts = {
        "head": (cx, head_y, 0.2 * u),
        "body": (cx, (shoulder + hip) / 2, 0.22 * u),
        "arm": (cx + arm_side * 0.28 * u, (shoulder + hip) / 2, 0.2 * u),
        "leg": (cx + arm_side * 0.1 * u, (hip + feet) / 2, 0.2 * u),
    }
    return Scene(img, parts, "sun", sun, feet, cx, 0.5 * u, setting)


def _render_animal(rng, s, setting) -> Scene:
    img, horizon, sun = _outdoor_background(rng, s, setting)
    u = s * rng.uniform(0.5, 0.62)
    feet = min(s * rng.uniform(0.8, 0.9), s - 2)
    cx = s * rng.uniform(0.35, 0.65)
    facing = rng.choice([-1, 1])
    _shadow(img, sun, cx, feet, 0.9 * u, s)
    fur = _jitter(rng, (160, 110, 70), 50)
    texture = _value_noise(rng, s, s, 10, 2)
    body_y = feet - 0.33 * u
    for dx in (-0.28, -0.16, 0.16, 0.28):
        _line(img, (cx + dx * u, body_y), (cx + dx * u, feet), 0.09 * u, np.float32(fur) * 0.85)
    tail_root = (cx - facing * 0.4 * u, body_y - 0.05 * u)
    _line(img, tail_root, (tail_root[0] - facing * 0.18 * u, body_y - 0.3 * u), 0.06 * u, fur)
    _ellipse(img, cx, body_y, 0.42 * u, 0.17 * u, fur, texture, 0.15)
    head = (cx + facing * 0.45 * u, body_y - 0.22 * u)
    for side in (-1, 1):
        ex = head[0] + side * 0.08 * u
        _poly(
            img,
            [
                (ex - 0.05 * u, head[1] - 0.06 * u),
                (ex + 0.05 * u, head[1] - 0.06 * u),
                (ex + side * 0.02 * u, head[1] - 0.22 * u),
            ],
            np.float32(fur) * 0.7,
        )
    _ellipse(img, head[0], head[1], 0.14 * u, 0.12 * u, fur, texture, 0.15)
    _ellipse(img, head[0] + facing * 0.06 * u, head[1] - 0.02 * u, 0.02 * u, 0.02 * u, (20, 20, 20))
    _ellipse(img, head[0] + facing * 0.13 * u, head[1] + 0.03 * u, 0.025 * u, 0.02 * u, (40, 25, 25))
    parts = {
        "head": (head[0], head[1] - 0.04 * u, 0.2 * u),
        "body": (cx, body_y, 0.25 * u),
        "tail": (tail_root[0] - facing * 0.1 * u, body_y - 0.18 * u, 0.18 * u),
        "leg": (cx + facing * 0.22 * u, (body_y + feet) / 2 + 0.05 * u, 0.18 * u),
    }
    return Scene(img, parts, "sun", sun, feet, cx, 0.9 * u, setting)


def _render_object(rng, s, setting) -> Scene:
    table_y = s * rng.uniform(0.6, 0.7)
    wall = _gradient(s, s, _jitter(rng, (225, 215, 190), 20), _jitter(rng, (180, 170, 150), 20))
    wall *= 1 + 0.05 * _value_noise(rng, s, s, 4, 2)[:, :, None]
    table = _gradient(s, s, _jitter(rng, GROUNDS[setting], 15), np.float32(_jitter(rng, GROUNDS[setting], 10)) * 0.75)
    grain = np.sin(np.arange(s, dtype=np.float32)[:, None] * rng.uniform(0.8, 1.4) + 3 * _value_noise(rng, s, s, 3, 2))
    table *= 1 + 0.07 * grain[:, :, None]
    img = np.where(np.arange(s)[:, None, None] >= table_y, table, wall).astype(np.float32)
    side = rng.integers(2)
    lamp = (s * (0.1 if side == 0 else 0.9), s * 0.1)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    img += (np.exp(-((np.hypot(xx - lamp[0], yy - lamp[1]) / (0.3 * s)) ** 2)) * 60)[:, :, None]
    _line(img, (lamp[0], 0), (lamp[0], lamp[1]), 0.015 * s, (60, 60, 60))
    _ellipse(img, lamp[0], lamp[1], 0.08 * s, 0.05 * s, (255, 245, 200))
    u = s * rng.uniform(0.5, 0.62)
    cx = s * rng.uniform(0.35, 0.65)
    base_y = min(table_y + 0.08 * s, s - 3)
    _shadow(img, lamp, cx, base_y, 0.5 * u, s)
    glaze = tuple(rng.uniform(40, 220, 3))
    texture = _value_noise(rng, s, s, 12, 1)
    body_y = base_y - 0.27 * u
    handle_side = rng.choice([-1, 1])
    hx = cx + handle_side * 0.27 * u
    cv_ring = _alpha(
        img.shape,
        lambda c: cv2.ellipse(
            c,
            (round(hx * 8), round(body_y * 8)),
            (round(0.1 * u * 8), round(0.13 * u * 8)),
            0,
            0,
            360,
            255,
            max(1, round(0.04 * u)),
            cv2.LINE_AA,
            3,
        ),
    )
    _paint(img, cv_ring, np.float32(glaze) * 0.8)
    _poly(
        img,
        [
            (cx - 0.09 * u, base_y),
            (cx + 0.09 * u, base_y),
            (cx + 0.12 * u, base_y - 0.06 * u),
            (cx - 0.12 * u, base_y - 0.06 * u),
        ],
        np.float32(glaze) * 0.7,
    )
    _ellipse(img, cx, body_y, 0.22 * u, 0.24 * u, glaze, texture, 0.1)
    neck_top = body_y - 0.55 * u
    _poly(
        img,
        [
            (cx - 0.06 * u, body_y - 0.2 * u),
            (cx + 0.06 * u, body_y - 0.2 * u),
            (cx + 0.05 * u, neck_top),
            (cx - 0.05 * u, neck_top),
        ],
        glaze,
        texture,
        0.1,
    )
    _ellipse(img, cx, neck_top, 0.08 * u, 0.025 * u, np.float32(glaze) * 0.6)
    # a highlight on the side of the lamp keeps the lighting consistent
    _ellipse(img, cx - 0.1 * u * (1 if side == 0 else -1), body_y - 0.08 * u, 0.04 * u, 0.08 * u, (250, 250, 250))
    parts = {
        "neck": (cx, body_y - 0.38 * u, 0.18 * u),
        "body": (cx, body_y, 0.24 * u),
        "handle": (hx + handle_side * 0.03 * u, body_y, 0.17 * u),
        "base": (cx, base_y - 0.05 * u, 0.16 * u),
    }
    return Scene(img, parts, "lamp", lamp, base_y, cx, 0.5 * u, setting)


def _render_scene(rng, s, setting) -> Scene:
    img, horizon, sun = _outdoor_background(rng, s, "in a green park")
    ridge_x = np.linspace(-0.1 * s, 1.1 * s, 7)
    peaks = horizon - s * rng.uniform(0.08, 0.3, 7)
    mountain_colour = _jitter(rng, (110, 120, 150), 20)
    _poly(
        img,
        [(ridge_x[0], horizon)] + list(zip(ridge_x, peaks)) + [(ridge_x[-1], horizon)],
        mountain_colour,
        _value_noise(rng, s, s, 6, 2),
        0.12,
    )
    top_peak = int(np.argmin(peaks[1:-1])) + 1
    u = s * rng.uniform(0.3, 0.4)
    hx = s * rng.uniform(0.25, 0.45) if rng.integers(2) else s * rng.uniform(0.55, 0.75)
    ground = min(horizon + s * rng.uniform(0.2, 0.3), s - 3)
    _shadow(img, sun, hx, ground, 1.0 * u, s)
    wall = _jitter(rng, (220, 200, 170), 30)
    _poly(
        img,
        [
            (hx - 0.5 * u, ground),
            (hx + 0.5 * u, ground),
            (hx + 0.5 * u, ground - 0.7 * u),
            (hx - 0.5 * u, ground - 0.7 * u),
        ],
        wall,
        _value_noise(rng, s, s, 10, 1),
        0.06,
    )
    roof_colour = _jitter(rng, (160, 60, 50), 30)
    roof_top = ground - 1.15 * u
    _poly(img, [(hx - 0.6 * u, ground - 0.7 * u), (hx + 0.6 * u, ground - 0.7 * u), (hx, roof_top)], roof_colour)
    _poly(
        img,
        [
            (hx - 0.12 * u, ground),
            (hx + 0.12 * u, ground),
            (hx + 0.12 * u, ground - 0.35 * u),
            (hx - 0.12 * u, ground - 0.35 * u),
        ],
        (90, 60, 40),
    )
    for dx in (-0.33, 0.33):
        _poly(
            img,
            [
                (hx + (dx - 0.09) * u, ground - 0.5 * u),
                (hx + (dx + 0.09) * u, ground - 0.5 * u),
                (hx + (dx + 0.09) * u, ground - 0.32 * u),
                (hx + (dx - 0.09) * u, ground - 0.32 * u),
            ],
            (170, 200, 230),
        )
    tx = hx + (0.95 * u if hx < s / 2 else -0.95 * u)
    _line(img, (tx, ground), (tx, ground - 0.5 * u), 0.1 * u, (100, 70, 40))
    crown = _jitter(rng, (50, 120, 50), 25)
    _ellipse(img, tx, ground - 0.7 * u, 0.3 * u, 0.35 * u, crown, _value_noise(rng, s, s, 12, 2), 0.25)
    parts = {
        "house": (hx, ground - 0.35 * u, 0.45 * u),
        "roof": (hx, ground - 0.9 * u, 0.35 * u),
        "tree": (tx, ground - 0.65 * u, 0.35 * u),
        "mountain": (float(ridge_x[top_peak]), float(peaks[top_peak]) + 0.05 * s, 0.2 * s),
    }
    return Scene(img, parts, "sun", sun, ground, hx, u, setting)


RENDERERS = {"human": _render_human, "animal": _render_animal, "object": _render_object, "scene": _render_scene}


# --- artifacts -----------------------------------------------------------------------------
@dataclass
class Artifact:
    category: str
    kind: str
    part: str | None
    tint: str | None
    polygon: list[float]
    mask: np.ndarray  # uint8 {0,1} [S, S], the pycocotools rasterization of `polygon`
    where: str = ""
    sentence: str = ""


def location_of(mask: np.ndarray) -> str:
    """One of 9 location phrases ("in the upper left", "at the top", ...) from the mask's centroid."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    row = min(2, int(3 * ys.mean() / h))
    col = min(2, int(3 * xs.mean() / w))
    return LOCATIONS[row][col]


def _radius_for_area(s, rng) -> float:
    return s * math.sqrt(rng.uniform(0.11, 0.22) / math.pi)


def _clamp_centre(x, y, r, s) -> tuple[float, float]:
    margin = 0.45 * r
    return float(np.clip(x, margin, s - margin)), float(np.clip(y, margin, s - margin))


def _plan(rng, scene: Scene, category: str, s: int) -> tuple[str, str | None, str | None, list[float]]:
    kind = str(rng.choice(KINDS[category]))
    part = tint = None
    if category == "structure":
        part = str(rng.choice(list(scene.parts)))
        px, py, pr = scene.parts[part]
        r = max(pr * 1.1, _radius_for_area(s, rng) * 0.85)
        if kind == "twisted":
            cx, cy = _clamp_centre(px, py, r, s)
        else:  # the copy goes beside the original, on the side with more room
            direction = 1.0 if px < s / 2 else -1.0
            cx, cy = _clamp_centre(px + direction * 1.6 * r, py + rng.uniform(-0.3, 0.3) * r, r, s)
        return kind, part, tint, _ellipse_polygon(cx, cy, r, r, 18, rng, 0.06)
    if category == "distortion":
        tint = str(rng.choice(list(TINTS))) if kind == "tinted" else None
        r = _radius_for_area(s, rng)
        cx, cy = _clamp_centre(rng.uniform(0, s), rng.uniform(0, s), r, s)
        return kind, part, tint, _blob_polygon(rng, cx, cy, r)
    if kind == "shadow":  # on the side facing the light, i.e. where no shadow can be
        toward = 1.0 if scene.light_xy[0] > scene.subject_x else -1.0
        width = max(scene.subject_w, 0.45 * s)
        cx = scene.subject_x + toward * 0.55 * width
        cy = min(scene.ground_y, s - 0.08 * s)
        return kind, part, tint, _ellipse_polygon(cx, cy, 0.55 * width, 0.13 * s, 18, rng, 0.08)
    r = _radius_for_area(s, rng)
    far_x = s * (0.75 if scene.light_xy[0] < s / 2 else 0.25)  # away from the real light
    cx, cy = _clamp_centre(far_x + rng.uniform(-0.15, 0.15) * s, s * rng.uniform(0.55, 0.8), r, s)
    return kind, part, tint, _ellipse_polygon(cx, cy, r, r, 18, rng, 0.05)


def _apply(rng, clean: np.ndarray, scene: Scene, art: Artifact, s: int) -> np.ndarray:
    """The artifact's altered image (whole frame); only the pixels under art.mask are used."""
    if art.kind == "twisted":
        xy = np.asarray(art.polygon).reshape(-1, 2)
        cx, cy = xy.mean(0)
        r = float(np.abs(xy - [cx, cy]).max()) * 1.05
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
        dx, dy = xx - cx, yy - cy
        dist = np.hypot(dx, dy)
        angle = rng.choice([-1, 1]) * rng.uniform(2.2, 3.2) * np.clip(1 - dist / r, 0, 1) ** 2
        cos, sin = np.cos(angle), np.sin(angle)
        map_x = (cx + cos * dx - sin * dy).astype(np.float32)
        map_y = (cy + sin * dx + cos * dy).astype(np.float32)
        return cv2.remap(clean, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    if art.kind == "extra":
        px, py, _ = scene.parts[art.part]
        xy = np.asarray(art.polygon).reshape(-1, 2)
        tx, ty = xy.mean(0)
        shift = np.float32([[1, 0, tx - px], [0, 1, ty - py]])
        return cv2.warpAffine(clean, shift, (s, s), borderMode=cv2.BORDER_REFLECT)
    if art.kind == "blurred":
        return cv2.GaussianBlur(clean, (0, 0), 0.035 * s + 1.0)
    if art.kind == "noisy":
        return clean + rng.normal(0, 50, clean.shape).astype(np.float32)
    if art.kind == "tinted":
        return clean * np.float32(TINTS[art.tint])[None, None, :]
    if art.kind == "shadow":
        return clean * 0.4
    if art.kind == "glow":
        xy = np.asarray(art.polygon).reshape(-1, 2)
        cx, cy = xy.mean(0)
        r = float(np.abs(xy - [cx, cy]).max())
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
        falloff = np.clip(1 - np.hypot(xx - cx, yy - cy) / r, 0, 1) ** 0.7
        return clean + (falloff * 190)[:, :, None] * np.float32([1.0, 0.95, 0.7])
    raise ValueError(art.kind)


GENERATOR_TRACE_PERIOD = 8  # px, the latent grid of an 8x VAE decoder
DEFAULT_GENERATOR_TRACE = 10.0


def generator_trace(size: int, strength: float = DEFAULT_GENERATOR_TRACE) -> np.ndarray:
    """The fake images' global fingerprint: an 8-px periodic grid, float [S, S, 1] in grey levels."""
    y, x = np.mgrid[0:size, 0:size]
    w = 2 * np.pi / GENERATOR_TRACE_PERIOD
    return (strength * np.cos(w * x) * np.cos(w * y))[:, :, None]


def render_example(
    seed: int, split: str, index: int, size: int = 128, fake: bool = True, trace: float = DEFAULT_GENERATOR_TRACE
):
    """(clean uint8 [S,S,3], fake uint8 [S,S,3], record body dict) for one image; deterministic."""
    rng = np.random.default_rng([seed, {"train": 0, "test": 1}.get(split, 2), index])
    content = CONTENT_TYPES[index % len(CONTENT_TYPES)]
    setting = str(rng.choice(SETTINGS[content]))
    scene = RENDERERS[content](rng, size, setting)
    clean = np.clip(scene.image, 0, 255)
    category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    artifacts: list[Artifact] = []
    union = np.zeros((size, size), np.uint8)
    wanted = 1 if rng.uniform() < 0.7 else 2
    for _ in range(12):  # a few tries to get areas in range and little overlap
        if len(artifacts) == wanted:
            break
        kind, part, tint, polygon = _plan(rng, scene, category, size)
        # inside the frame and rounded as written to JSON, so the mask is exactly the GT
        polygon = [round(min(max(v, 0.0), float(size)), 2) for v in polygon]
        mask = rasterize_polygons([polygon], size, size)
        area = mask.mean()
        if not MIN_AREA <= area <= MAX_AREA or (mask & union).sum() > 0.1 * mask.sum():
            continue
        art = Artifact(category, kind, part, tint, polygon, mask)
        art.where = location_of(mask)
        art.sentence = _sentence(kind, part, tint, art.where)
        if any(a.sentence == art.sentence for a in artifacts):
            continue
        artifacts.append(art)
        union |= mask
    if not artifacts:
        raise RuntimeError(f"could not place an artifact for {split}[{index}] (seed {seed}, size {size})")
    result = clean.copy()
    for art in artifacts:
        altered = np.clip(_apply(rng, clean, scene, art, size), 0, 255)
        result = np.where(art.mask[:, :, None].astype(bool), altered, result)
    clean_u8 = np.round(clean).astype(np.uint8)
    fake_u8 = np.round(np.clip(result + generator_trace(size, trace), 0, 255)).astype(np.uint8)
    artifacts.sort(key=lambda a: (a.mask.nonzero()[0].mean(), a.mask.nonzero()[1].mean()))
    body = {
        "caption": _caption(content, setting, artifacts, scene.light),
        "refs": [
            {
                "sentence": a.sentence,
                "explanation": _explanation(a.kind, a.part, a.tint, scene.light, a.where),
                "bbox": None,
                "segmentation": [a.polygon],
                "artifact_category": a.category,
            }
            for a in artifacts
        ],
        "content_type": content,
        "artifact_category": category,
    }
    return clean_u8, fake_u8, body


# --- writing -------------------------------------------------------------------------------
def _write_png(path: Path, image: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise OSError(f"PNG encoding failed for {path}")
    atomic_write_bytes(path, data.tobytes())


def _make_one(job) -> tuple[int, dict]:
    out, seed, split, index, size, id_offset, trace = job
    clean, fake, body = render_example(seed, split, index, size, trace=trace)
    name = f"{split}_{index:05d}.png"
    out = Path(out)
    _write_png(out / split / "images" / name, fake)
    _write_png(out / "detection" / split / "toyscars" / "1_fake" / name, fake)
    _write_png(out / "detection" / split / "toyscars" / "0_real" / name, clean)
    body = {"img_file_name": name, **body}
    return index, {str(id_offset + index): body}


def make_toy_data(
    out_dir,
    num_train: int = 400,
    num_test: int = 100,
    seed: int = 0,
    size: int = 128,
    workers: int = 1,
    progress: bool = False,
    trace: float = DEFAULT_GENERATOR_TRACE,
) -> Path:
    """Write ToyScars under `out_dir` (layout in the module docstring). Returns the output path."""
    if size < 48:
        raise ValueError(f"size {size} is too small for ToyScars (min 48 px)")
    out = Path(out_dir)
    counts = {}
    for split, count, offset in (("train", num_train, 0), ("test", num_test, num_train)):
        for folder in (
            out / split / "images",
            out / split / "annotations",
            out / "detection" / split / "toyscars" / "0_real",
            out / "detection" / split / "toyscars" / "1_fake",
        ):
            folder.mkdir(parents=True, exist_ok=True)
        jobs = [(str(out), seed, split, i, size, offset, trace) for i in range(count)]
        if workers > 1 and count > 1:
            with ProcessPoolExecutor(workers) as pool:
                results = list(
                    tqdm(
                        pool.map(_make_one, jobs, chunksize=16),
                        total=count,
                        disable=not progress,
                        desc=f"ToyScars {split}",
                    )
                )
        else:
            results = [_make_one(job) for job in tqdm(jobs, disable=not progress, desc=f"ToyScars {split}")]
        records = [entry for _, entry in sorted(results, key=lambda r: r[0])]
        atomic_write_text(out / split / "annotations" / f"{split}.json", json.dumps(records, indent=1))
        counts[split] = {"images": count, "refs": sum(len(next(iter(r.values()))["refs"]) for r in records)}
    meta = {
        "dataset": "ToyScars",
        "version": 2,
        "seed": seed,
        "size": size,
        "generator_trace": trace,
        "splits": counts,
        "content_types": list(CONTENT_TYPES),
        "artifact_categories": list(CATEGORIES),
    }
    atomic_write_text(out / "toyscars.json", json.dumps(meta, indent=1))
    return out


# --- CLI -----------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_output_dir_argument(parser, required=True, help="output directory (created if missing)")
    parser.add_argument("--num-train", type=int, default=400, help="training images (default 400)")
    parser.add_argument("--num-test", type=int, default=100, help="test images (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128, min 48)")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="processes (default: min(2, CPUs)); the output does not depend on it",
    )
    parser.add_argument(
        "--generator-trace",
        type=float,
        default=DEFAULT_GENERATOR_TRACE,
        help="strength (grey levels) of the fake images' 8-px generator fingerprint; 0 = none",
    )


def run(args: argparse.Namespace) -> int:
    if args.num_train < 0 or args.num_test < 0:
        raise OptionError("--num-train and --num-test must be >= 0")
    if args.size < 48:
        raise OptionError(f"--size {args.size} is too small (min 48)")
    check_output_dir_argument(args.output_dir)
    start = time.perf_counter()
    out = make_toy_data(
        args.output_dir,
        args.num_train,
        args.num_test,
        args.seed,
        args.size,
        args.workers,
        progress=True,
        trace=args.generator_trace,
    )
    total = args.num_train + args.num_test
    print(f"wrote ToyScars ({total} images, {args.size} px) to {out} in {time.perf_counter() - start:.1f} s")
    return 0
