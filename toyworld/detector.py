"""An analytic (weight-free) detector for the toy world: colour segmentation, components, shape fitting.

Pipeline of `ShapeDetector.detect`:
1. Colour: each pixel is explained as a blend `background + alpha * (colour - background)` of the background
   and one palette colour; the colour with the smallest residual wins, and the pixel is foreground when its
   alpha >= 0.5 and the residual <= `max_residual`. Anti-aliased / blurred edges thus split at the true
   edge instead of turning into other colours, and off-palette pixels stay background.
2. Cleanup: a pixel takes label L when >= 7 of its 8 neighbours are L (removes specks and the tips of
   1-pixel-wide protrusions, fills pinholes, keeps square corners).
3. 4-connected components of equal labels (numpy min-label propagation with pointer jumping); components
   smaller than `min_area_fraction` of the image are noise.
4. Shape by analysis-by-synthesis on the soft mask (the alphas of the component's colour around it):
   for each shape hypothesis, its side follows from the alpha mass (area) and its box from the alpha
   centroid; the shape's anti-aliased coverage there is compared with the soft mask by soft IoU
   (sum of minima / sum of maxima). The best IoU names the shape and is the detection's score. Mass and
   centroid survive blur, and sub-pixel coverage keeps 8-px circles apart from squares. Blobs with a
   bounding-box aspect ratio above `max_aspect` or a best IoU below `min_iou` are not objects.

`ShapeDetector` implements evaluation.geneval_rules.Detector, the interface GenEval's rules use, so a learned
detector (evaluation.detectors.Mask2FormerDetector) can replace it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Optional

import numpy as np
from PIL import Image

from toyworld.world import BACKGROUND, COLORS, CROSS_ARM, RING_HOLE

WINDOW_PAD = 2  # pixels around a component's box that its soft mask may extend to (blurred edges)


@dataclass(frozen=True)
class ShapeGeometry:
    """A shape filling its unit box (u right, v down): indicator, area share of the box, centroid height."""

    region: Callable[[np.ndarray, np.ndarray], np.ndarray]
    area_fraction: float
    centroid_v: float


GEOMETRY: dict[str, ShapeGeometry] = {
    "circle": ShapeGeometry(lambda u, v: (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25, np.pi / 4, 0.5),
    "square": ShapeGeometry(lambda u, v: np.ones(np.broadcast(u, v).shape, bool), 1.0, 0.5),
    "triangle": ShapeGeometry(lambda u, v: np.abs(u - 0.5) <= v / 2, 0.5, 2 / 3),  # apex up
    "cross": ShapeGeometry(lambda u, v: (np.abs(u - 0.5) <= CROSS_ARM / 2) | (np.abs(v - 0.5) <= CROSS_ARM / 2),
                           CROSS_ARM * (2 - CROSS_ARM), 0.5),
    "ring": ShapeGeometry(lambda u, v: ((u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25)
                          & ((u - 0.5) ** 2 + (v - 0.5) ** 2 >= (RING_HOLE / 2) ** 2),
                          np.pi / 4 * (1 - RING_HOLE ** 2), 0.5),
}


@dataclass(frozen=True)
class Detection:
    """One detected object; bbox is (x0, y0, x1, y1) in pixels with x1, y1 exclusive."""

    class_name: str
    color: str
    bbox: tuple[int, int, int, int]
    centroid: tuple[float, float]
    area: int
    score: float  # soft IoU of the fitted shape, in (0, 1]; orders detections like a detector's confidence

    def to_dict(self) -> dict:
        return asdict(self)


def blend_alphas(pixels: np.ndarray, palette: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel and palette colour: alpha >= 0 of the closest blend background + alpha * (colour -
    background), and the RGB distance of the pixel to that blend; both (H, W, K)."""
    offsets = pixels.astype(np.float64)[..., None, :] - background  # (H, W, 1, 3)
    directions = palette - background  # (K, 3)
    alpha = np.maximum((offsets * directions).sum(-1) / (directions ** 2).sum(-1), 0.0)
    residual = np.linalg.norm(offsets - alpha[..., None] * directions, axis=-1)
    return alpha, residual


def color_labels(alpha: np.ndarray, residual: np.ndarray, max_residual: float) -> np.ndarray:
    """Per-pixel label: k + 1 for the best-explaining palette colour k when its alpha >= 0.5 and its
    residual <= `max_residual`, else 0 (background)."""
    best = residual.argmin(-1)[..., None]
    best_alpha = np.take_along_axis(alpha, best, -1)[..., 0]
    best_residual = np.take_along_axis(residual, best, -1)[..., 0]
    return np.where((best_alpha >= 0.5) & (best_residual <= max_residual), best[..., 0] + 1, 0)


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
    return np.where(counts.max(0) >= min_neighbours, counts.argmax(0), labels)


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
        new = np.append(new.ravel(), sentinel)[new]  # pointer jumping: take the id of the pixel pointed to
        if np.array_equal(new, ids):
            break
        ids = new
    compact = np.unique(ids, return_inverse=True)[1].reshape(h, w)  # the sentinel, the largest id, sorts last
    return np.where(ids == sentinel, -1, compact)


def shape_coverage(shape: str, box: tuple[float, float, float], window: tuple[int, int, int, int],
                   subsamples: int = 4) -> np.ndarray:
    """Fraction of each pixel of `window` (x0, y0, x1, y1) covered by `shape` in the box (x0, y0, side)."""
    box_x0, box_y0, side = box
    x0, y0, x1, y1 = window
    offsets = (np.arange(subsamples) + 0.5) / subsamples
    u = (((np.arange(x0, x1)[:, None] + offsets).ravel() - box_x0) / side)[None, :]
    v = (((np.arange(y0, y1)[:, None] + offsets).ravel() - box_y0) / side)[:, None]
    inside = GEOMETRY[shape].region(u, v) & (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    return inside.reshape(y1 - y0, subsamples, x1 - x0, subsamples).mean((1, 3))


def fit_shapes(soft: np.ndarray, window: tuple[int, int, int, int]) -> dict[str, float]:
    """Soft IoU with `soft` (the soft mask over `window`) of each shape, sized by the mask's mass and
    placed at its centroid."""
    mass = soft.sum()
    ys, xs = np.mgrid[window[1]:window[3], window[0]:window[2]] + 0.5
    centre_x, centre_y = (soft * xs).sum() / mass, (soft * ys).sum() / mass
    ious = {}
    for shape, geometry in GEOMETRY.items():
        side = float(np.sqrt(mass / geometry.area_fraction))
        coverage = shape_coverage(shape, (centre_x - side / 2, centre_y - geometry.centroid_v * side, side), window)
        ious[shape] = float(np.minimum(soft, coverage).sum() / np.maximum(soft, coverage).sum())
    return ious


class ShapeDetector:
    """The analytic detector; its thresholds are relative, so it works at any resolution.

    As a GenEval detector (evaluation.geneval_rules.Detector) it keeps every detection (no score thresholds: its
    scores are shape-fit IoUs of accepted shapes) and reads colours from its own colour segmentation.
    """

    name = "toy"
    thresholds = (0.0, 0.0)

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

    def detect_batch(self, images: list[Image.Image]) -> list[list[Detection]]:
        return [self.detect(image) for image in images]

    def classify_colors(self, image, detections: list[Detection], class_name: str) -> list[str]:
        return [d.color for d in detections]

    def detect(self, image: Image.Image) -> list[Detection]:
        """Detections in `image`, best shape fit first."""
        alpha, residual = blend_alphas(np.asarray(image.convert("RGB")), self.palette, self.background)
        labels = clean_labels(color_labels(alpha, residual, self.max_residual), len(self.color_names) + 1)
        components = connected_components(labels)
        sizes = np.bincount(components[components >= 0])
        nearest = residual.argmin(-1)
        detections = []
        for component in np.flatnonzero(sizes >= self.min_area_fraction * labels.size):
            mask = components == component
            k = labels[mask][0] - 1
            soft = np.where(mask | ((labels == 0) & (nearest == k)), np.clip(alpha[..., k], 0.0, 1.0), 0.0)
            detection = self._describe(mask, soft, self.color_names[k])
            if detection is not None:
                detections.append(detection)
        return sorted(detections, key=lambda d: -d.score)

    def _describe(self, mask: np.ndarray, soft: np.ndarray, color: str) -> Optional[Detection]:
        """The detection of one component (`soft`: its colour's alphas), or None when it is no object."""
        ys, xs = np.nonzero(mask)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        width, height = bbox[2] - bbox[0], bbox[3] - bbox[1]
        if max(width, height) > self.max_aspect * min(width, height):
            return None
        h, w = mask.shape
        window = (max(bbox[0] - WINDOW_PAD, 0), max(bbox[1] - WINDOW_PAD, 0),
                  min(bbox[2] + WINDOW_PAD, w), min(bbox[3] + WINDOW_PAD, h))
        ious = fit_shapes(soft[window[1]:window[3], window[0]:window[2]], window)
        shape = max(ious, key=ious.get)
        if ious[shape] < self.min_iou:
            return None
        centroid = (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5)
        return Detection(shape, color, bbox, centroid, int(len(xs)), ious[shape])
