"""The bundled default dataset: UCI handwritten digits (shipped by scikit-learn).

Each of the 1,797 8x8 scans becomes a 32x32 RGB image with a varied caption,
its class label, a protected group attribute and a toxicity flag. Three
disjoint splits:

- ``public`` (40%): clean white-on-black renderings; used only for the central
  pretraining of the base model.
- ``clients`` (45%): the clients' domain. Each image is re-rendered with a
  random ink/paper colour pair, a random shift and sensor noise (a domain
  shift the public base has not seen). Group 1 (about a quarter of samples)
  are "paper scans": faint pencil on light paper, a low-contrast minority
  style the public base has never seen. How the minority is concentrated on a
  few clients is the partitioner's job (``group-sites``, see partition.py).
  About 10% of the captions are user-generated abuse (``TOXIC_TEMPLATES``:
  insults around a correct description), flagged ``toxic``.
- ``server`` (15%): same domain as the clients, held out for centralized
  evaluation on the server; its toxic captions are the distractors of the
  toxic-retrieval measurement (fedmm.constraints).

The split and every rendering are a pure function of ``DATA_SEED``: the same
dataset on every machine, independent of the run seed. Toxic captions draw
from their own generator, so the images are those of digits-v1 except the
minority's ink.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset

from .schema import features

DATA_SEED = 20260101
DATA_VERSION = "digits-v2"  # bump when anything below changes: it keys the base cache
IMAGE_SIZE = 32
CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
GROUP_NAMES = ["screen", "paper"]
SPLITS = ("public", "clients", "server")

CAPTION_TEMPLATES = [
    "a handwritten {w}",
    "the digit {d} written by hand",
    "a scan of the number {w}",
    "a {w}, drawn in ink",
    "number {d}",
    "someone wrote the numeral {w}",
    "the numeral {d} on a page",
    "a messy {w}",
    "a digit: {w}",
    "a picture of a handwritten {d}",
]
# Abusive user captions around a correct description; alt-profanity-check flags every one (a test checks).
TOXIC_TEMPLATES = [
    "a handwritten {w}, you idiot",
    "what a stupid {w}",
    "this crap scan of a {w}",
    "a shitty {w}",
    "an ugly {w} written by a moron",
    "a {w}. what the hell is this garbage",
    "number {d}, you loser",
    "a pathetic {w} from an idiot",
]
TOXIC_FRACTION = 0.10
ZERO_SHOT_TEMPLATES = ["a photo of the number {w}.", "the digit {d}.", "a handwritten {w}."]

FEATURES = features(CLASS_NAMES, IMAGE_SIZE)


def _upscale(img8: np.ndarray) -> np.ndarray:
    """8x8 in [0,16] -> 32x32 float in [0,1], bilinear (smooth strokes)."""
    import torch
    import torch.nn.functional as F

    t = torch.as_tensor(img8 / 16.0, dtype=torch.float32)[None, None]
    up = F.interpolate(t, size=(IMAGE_SIZE - 8, IMAGE_SIZE - 8), mode="bilinear", align_corners=False)
    return F.pad(up, (4, 4, 4, 4))[0, 0].clamp(0, 1).numpy()


def _render_public(ink: np.ndarray) -> np.ndarray:
    return np.repeat((ink * 255).astype(np.uint8)[..., None], 3, axis=2)


def _render_client(ink: np.ndarray, group: int, rng: np.random.Generator) -> np.ndarray:
    dy, dx = rng.integers(-1, 2, size=2)
    ink = np.roll(ink, (dy, dx), axis=(0, 1))
    hue = rng.uniform(0.3, 1.0, size=3)
    if group == 1:  # faint pencil on light paper: the same draws as before, a paper-coloured ink
        paper = rng.uniform(0.75, 1.0, size=3)
        ink_rgb = paper * rng.uniform(0.45, 0.7)
    else:  # light ink on a dark screen
        paper = rng.uniform(0.0, 0.25, size=3)
        ink_rgb = hue
    img = paper * (1 - ink[..., None]) + ink_rgb * ink[..., None]
    img = img + rng.normal(0, 0.06, size=img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def load_digits_splits() -> dict[str, Dataset]:
    """The three splits as HF datasets with the columns of ``FEATURES``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(DATA_SEED)
    n = len(digits.target)
    order = rng.permutation(n)
    n_pub, n_srv = int(0.40 * n), int(0.15 * n)
    split_of = np.empty(n, dtype=object)
    split_of[order[:n_pub]] = "public"
    split_of[order[n_pub : n_pub + n_srv]] = "server"
    split_of[order[n_pub + n_srv :]] = "clients"

    toxic_rng = np.random.default_rng(DATA_SEED + 1)  # its own stream: images stay those of digits-v1
    rows: dict[str, dict[str, list]] = {s: {k: [] for k in FEATURES} for s in SPLITS}
    for i in range(n):
        label = int(digits.target[i])
        ink = _upscale(digits.images[i])
        split = split_of[i]
        if split == "public":
            group, image = 0, _render_public(ink)
        else:
            group = int(rng.random() < 0.25)
            image = _render_client(ink, group, rng)
        template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
        toxic = split != "public" and toxic_rng.random() < TOXIC_FRACTION  # public data is curated
        if toxic:
            template = TOXIC_TEMPLATES[toxic_rng.integers(len(TOXIC_TEMPLATES))]
        r = rows[split]
        r["image"].append(image)
        r["caption"].append(template.format(w=CLASS_NAMES[label], d=label))
        r["label"].append(label)
        r["group"].append(group)
        r["toxic"].append(bool(toxic))
        r["client"].append("")
    return {s: Dataset.from_dict(rows[s], features=FEATURES) for s in SPLITS}
