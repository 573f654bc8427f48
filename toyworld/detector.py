"""An analytic (weight-free) detector for the toy world: colour segmentation, components, shape geometry.

Pipeline of `ShapeDetector.detect`:
1. Colour: each pixel is explained as a blend `background + alpha * (colour - background)` of the background
   and one palette colour; the colour with the smallest residual wins, and the pixel is foreground when its
   alpha >= 0.5 and the residual <= `max_residual`. Anti-aliased / blurred edges thus split at the true
   edge instead of turning into other colours, and off-palette pixels stay background.
2. Cleanup: a pixel takes label L when >= 7 of its 8 neighbours are L (removes salt noise, fills pinholes
   and 1-pixel spurs; keeps square corners).
3. 4-connected components of equal labels (numpy min-label propagation with pointer jumping); components
   smaller than `min_area_fraction` of the image are noise.
4. Shape from geometry: each shape's template (rasterised like the world draws it) is stretched to the
   component's bounding box; the best IoU names the shape and is the detection's score. Blobs with a
   bounding-box aspect ratio above `max_aspect` or a best IoU below `min_iou` are not objects.

`Detector` is the interface the scorer uses, so a learned detector can replace this one.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Optional, Protocol

import numpy as np
from PIL import Image

from toyworld.world import BACKGROUND, COLORS

# Each shape as an indicator on its bounding box normalised to the unit square (u right, v down).
SHAPE_REGIONS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda u, v: (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25,
    "square": lambda u, v: (u >= 0) & (v >= 0),
    "triangle": lambda u, v: np.abs(u - 0.5) <= v / 2,  # apex up, base along the bottom edge
}


@dataclass(frozen=True)
class Detection:
    """One detected object; bbox is (x0, y0, x1, y1) in pixels with x1, y1 exclusive."""

    class_name: str
    color: str
    bbox: tuple[int, int, int, int]
    centroid: tuple[float, float]
    area: int
    score: float  # IoU with the shape template, in (0, 1]; orders detections like a detector's confidence

    def to_dict(self) -> dict:
        return asdict(self)


class Detector(Protocol):
    def detect(self, image: Image.Image) -> list[Detection]:
        """Detections in `image`, most confident first."""
        ...


def color_labels(pixels: np.ndarray, palette: np.ndarray, background: np.ndarray, max_residual: float) -> np.ndarray:
    """Per-pixel label: 0 for background, k + 1 for palette colour k (see the module docstring, step 1)."""
    offsets = pixels.astype(np.float64)[..., None, :] - background  # (H, W, 1, 3)
    directions = palette - background  # (K, 3)
    alpha = np.maximum((offsets * directions).sum(-1) / (directions ** 2).sum(-1), 0.0)  # (H, W, K)
    residual = np.linalg.norm(offsets - alpha[..., None] * directions, axis=-1)
    best = residual.argmin(-1)
    best_alpha = np.take_along_axis(alpha, best[..., None], -1)[..., 0]
    best_residual = np.take_along_axis(residual, best[..., None], -1)[..., 0]
    return np.where((best_alpha >= 0.5) & (best_residual <= max_residual), best + 1, 0)


def clean_labels(labels: np.ndarray, num_labels: int, min_neighbours: int = 7) -> np.ndarray:
    """Give a pixel label L when at least `min_neighbours` of its 8 neighbours have label L."""
    h, w = labels.shape
    padded = np.pad(labels, 1)
    counts = np.zeros((num_labels, h, w), dtype=np.int64)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                shifted = padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                counts += shifted[None] == np.arange(num_labels)[:, None, None]
    majority = counts.argmax(0)
    return np.where(counts.max(0) >= min_neighbours, majority, labels)


def connected_components(labels: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-zero labels: ids 0..n-1, -1 on background (label 0)."""
    h, w = labels.shape
    sentinel = h * w
    ids = np.where(labels > 0, np.arange(h * w).reshape(h, w), sentinel)
    same_down = (labels[1:] == labels[:-1]) & (labels[1:] > 0)
    same_right = (labels[:, 1:] == labels[:, :-1]) & (labels[:, 1:] > 0)
    while True:
        new = ids.copy()
        new[1:] = np.where(same_down, np.minimum(new[1:], ids[:-1]), new[1:])
        new[:-1] = np.where(same_down, np.minimum(new[:-1], ids[1:]), new[:-1])
        new[:, 1:] = np.where(same_right, np.minimum(new[:, 1:], ids[:, :-1]), new[:, 1:])
        new[:, :-1] = np.where(same_right, np.minimum(new[:, :-1], ids[:, 1:]), new[:, :-1])
        new = np.append(new.ravel(), sentinel)[new]  # pointer jumping: take the label of the pixel pointed to
        if np.array_equal(new, ids):
            break
        ids = new
    compact = np.unique(ids, return_inverse=True)[1].reshape(h, w)  # the sentinel, the largest id, sorts last
    return np.where(ids == sentinel, -1, compact)


@functools.lru_cache(maxsize=4096)
def shape_template(shape: str, height: int, width: int, subsamples: int = 4) -> np.ndarray:
    """Pixels of a `height` x `width` box that `shape`, filling the box, covers at least half of."""
    offsets = (np.arange(subsamples) + 0.5) / subsamples
    v = ((np.arange(height)[:, None] + offsets).ravel() / height)[:, None]
    u = ((np.arange(width)[:, None] + offsets).ravel() / width)[None, :]
    coverage = SHAPE_REGIONS[shape](u, v).reshape(height, subsamples, width, subsamples).mean((1, 3))
    return coverage >= 0.5


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """The shape whose template, stretched to the mask's bounding box, has the highest IoU with it."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    ious = {}
    for shape in SHAPE_REGIONS:
        template = shape_template(shape, *crop.shape)
        ious[shape] = float((crop & template).sum() / (crop | template).sum())
    best = max(ious, key=ious.get)
    return best, ious[best]


class ShapeDetector:
    """The analytic detector; its thresholds are relative, so it works at any resolution."""

    def __init__(
        self,
        palette: Mapping[str, tuple[int, int, int]] = COLORS,
        background: tuple[int, int, int] = BACKGROUND,
        max_residual: float = 60.0,
        min_area_fraction: float = 0.005,
        min_iou: float = 0.6,
        max_aspect: float = 1.6,
    ):
        self.color_names = list(palette)
        self.palette = np.array(list(palette.values()), dtype=np.float64)
        self.background = np.array(background, dtype=np.float64)
        self.max_residual = max_residual
        self.min_area_fraction = min_area_fraction
        self.min_iou = min_iou
        self.max_aspect = max_aspect

    def detect(self, image: Image.Image) -> list[Detection]:
        """Detections in `image`, best shape fit first."""
        pixels = np.asarray(image.convert("RGB"))
        labels = color_labels(pixels, self.palette, self.background, self.max_residual)
        labels = clean_labels(labels, len(self.color_names) + 1)
        components = connected_components(labels)
        sizes = np.bincount(components[components >= 0])
        detections = []
        for component in np.flatnonzero(sizes >= self.min_area_fraction * labels.size):
            mask = components == component
            detection = self._describe(mask, self.color_names[labels[mask][0] - 1])
            if detection is not None:
                detections.append(detection)
        return sorted(detections, key=lambda d: -d.score)

    def _describe(self, mask: np.ndarray, color: str) -> Optional[Detection]:
        """The detection for one component, or None when it is too elongated or fits no shape well enough."""
        ys, xs = np.nonzero(mask)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        width, height = bbox[2] - bbox[0], bbox[3] - bbox[1]
        if max(width, height) > self.max_aspect * min(width, height):
            return None
        shape, iou = classify_shape(mask)
        if iou < self.min_iou:
            return None
        centroid = (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5)
        return Detection(shape, color, bbox, centroid, int(len(xs)), iou)
