"""GenEval's detector and colour classifier on transformers, instead of mmdet 2.x / mmcv-full 1.7 / open_clip.

- `Mask2FormerDetector`: `Mask2FormerForUniversalSegmentation` (default
  facebook/mask2former-swin-small-coco-instance: converted Detectron2 weights, not mmdet's, so numbers can differ
  slightly from the official evaluator's; `python -m evaluation.mmdet_convert` turns the official mmdet checkpoint into
  a folder this class loads) run as GenEval runs mmdet's Mask2Former: test-time resize so the image fits 1333 x 800
  keeping its aspect (cv2's bilinear without antialiasing on the uint8 image, as mmcv does; `resize="pil"` for
  PIL's), padded to a multiple of 32; every (query, class) pair ranked by its class
  probability (softmax without the no-object class), the top 100 kept, each with its own mask (no merging of
  overlapping masks): mask logits upsampled to the padded input, cropped to the image, resized to the original size;
  binary mask = sigmoid > 0.5; score = class probability x the mean sigmoid inside the binary mask; box = the
  mask's extent. transformers' post_process_instance_segmentation is not used: it thresholds at 0.5 and gives
  overlapping masks to one instance (METHODS 5.5).
- `ClipColorClassifier`: `CLIPModel` (default openai/clip-vit-large-patch14) as a zero-shot classifier over
  GenEval's ten colours with its three templates ("a photo of a {c} {object}", "a photo of a {c}-colored {object}",
  "a photo of a {c} object"; text embeddings normalised, averaged per colour, normalised), applied to each object's
  mask pasted on a #999999 background and cropped to its box, preprocessed as open_clip does for GenEval (bicubic
  resize of the shorter side to 224, centre crop with torchvision's rounding; `clip_preprocess="transformers"` for
  the CLIPImageProcessor).
- COCO class names (the model's id2label) are mapped to GenEval's object names ("keyboard" -> "computer keyboard",
  "mouse" -> "computer mouse", "remote" -> "tv remote"); classes GenEval does not name are dropped.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from .geneval_rules import COLORS, COUNTING_THRESHOLD, THRESHOLD

logger = logging.getLogger(__name__)

DEFAULT_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
BACKGROUND = (0x99, 0x99, 0x99)  # GenEval's "#999"
TEST_SCALE = (1333, 800)  # (long side, short side) of mmdet's test-time resize
SIZE_DIVISOR = 32
MAX_PER_IMAGE = 100
TEMPLATES = ("a photo of a {c} {obj}", "a photo of a {c}-colored {obj}", "a photo of a {c} object")
# COCO names (Detectron2 / mmdet / HF id2label spellings) whose GenEval object name differs
GENEVAL_NAMES = {"keyboard": "computer keyboard", "mouse": "computer mouse", "remote": "tv remote",
                 "aeroplane": "airplane", "motorbike": "motorcycle", "sofa": "couch", "tvmonitor": "tv",
                 "pottedplant": "potted plant", "diningtable": "dining table", "hair dryer": "hair drier"}


def geneval_name(coco_name: str) -> str:
    name = coco_name.replace("_", " ").strip().lower()
    return GENEVAL_NAMES.get(name, name)


@dataclass
class MaskDetection:
    """A detected object: GenEval class name, score (class x mask), box (x0, y0, x1, y1) and binary mask [H, W]."""

    class_name: str
    score: float
    bbox: tuple[float, float, float, float]
    mask: np.ndarray

    def to_dict(self) -> dict:
        return {"class_name": self.class_name, "score": self.score, "bbox": list(self.bbox)}


def resized_size(width: int, height: int, scale: tuple[int, int] = TEST_SCALE) -> tuple[int, int]:
    """mmdet's keep-ratio resize: the largest size with long side <= scale[0] and short side <= scale[1]."""
    factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Boxes (x0, y0, x1, y1), x1/y1 exclusive, of binary masks [N, H, W]; an empty mask gives zeros."""
    boxes = torch.zeros(masks.shape[0], 4)
    for i, mask in enumerate(masks):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if len(xs):
            boxes[i] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    return boxes


RESIZE_BACKENDS = ("cv2", "pil")
CLIP_PREPROCESS = ("open_clip", "transformers")


def check_choice(value: str, choices: tuple[str, ...], flag: str) -> None:
    if value not in choices:
        from common.cli import UsageError

        raise UsageError(f"{flag} {value!r}: choose one of {', '.join(choices)}")


def resize_image(image, size: tuple[int, int], backend: str = "cv2") -> np.ndarray:
    """The RGB image resized to size = (width, height), uint8 [H, W, 3]. "cv2": what GenEval's evaluator does
    (mmcv's imresize: cv2.resize with INTER_LINEAR, bilinear without antialiasing, on the uint8 image); "pil":
    PIL's bilinear filter, which antialiases when it shrinks."""
    rgb = image.convert("RGB")
    if backend == "cv2":
        import cv2

        return cv2.resize(np.asarray(rgb), tuple(size), interpolation=cv2.INTER_LINEAR)
    from PIL import Image

    return np.asarray(rgb.resize(tuple(size), Image.BILINEAR))


def open_clip_pixels(crops: list, size: int, mean, std) -> torch.Tensor:
    """open_clip's preprocessing of GenEval's colour crops (torchvision Resize(size, BICUBIC) of the shorter side
    on the PIL image, long side int(size * long / short); CenterCrop(size), whose offsets are round((H - size) / 2)
    with Python's rounding; ToTensor; Normalize): [N, 3, size, size]."""
    from PIL import Image

    out = []
    for crop in crops:
        crop = crop.convert("RGB")
        w, h = crop.size
        short, long = min(w, h), max(w, h)
        new_long = int(size * long / short)
        new_size = (size, new_long) if w <= h else (new_long, size)
        if new_size != (w, h):
            crop = crop.resize(new_size, Image.BICUBIC)
        w, h = crop.size
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        crop = crop.crop((left, top, left + size, top + size))
        out.append(torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1))
    mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (torch.stack(out) - mean) / std


def _load(loader, model_id: str, flag: str):
    from common.cli import hub_error

    try:
        return loader(model_id)
    except OSError as err:
        raise hub_error(model_id, err, flag) from err


class Mask2FormerDetector:
    """GenEval's object detector (Mask2Former instance segmentation) with its CLIP colour classifier."""

    name = "mask2former"
    thresholds = (THRESHOLD, COUNTING_THRESHOLD)

    def __init__(self, model_id: str = DEFAULT_DETECTOR, clip_id: str = DEFAULT_CLIP, device=None,
                 dtype: torch.dtype = torch.float32, max_per_image: int = MAX_PER_IMAGE,
                 test_scale: tuple[int, int] = TEST_SCALE, resize: str = "cv2", clip_preprocess: str = "open_clip"):
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        check_choice(resize, RESIZE_BACKENDS, "--resize")

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = _load(lambda m: Mask2FormerForUniversalSegmentation.from_pretrained(m, dtype=dtype), model_id,
                           "--detector_model").to(self.device).eval()
        processor = _load(AutoImageProcessor.from_pretrained, model_id, "--detector_model")
        scale = 255.0 if max(processor.image_mean) <= 1 else 1.0
        self.mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(3, 1, 1) * scale
        self.std = torch.tensor(processor.image_std, dtype=torch.float32).view(3, 1, 1) * scale
        self.class_names = {int(i): geneval_name(n) for i, n in self.model.config.id2label.items()}
        self.max_per_image, self.test_scale, self.resize = max_per_image, tuple(test_scale), resize
        self.colors = ClipColorClassifier(clip_id, self.device, dtype, clip_preprocess)

    def preprocess(self, images: list) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Resized (keep ratio into 1333 x 800), normalised, zero-padded to a multiple of 32: [B, 3, H, W]; and
        each image's resized (width, height)."""
        sizes = [resized_size(*image.size, self.test_scale) for image in images]
        height = max(math.ceil(h / SIZE_DIVISOR) * SIZE_DIVISOR for _, h in sizes)
        width = max(math.ceil(w / SIZE_DIVISOR) * SIZE_DIVISOR for w, _ in sizes)
        batch = torch.zeros(len(images), 3, height, width)
        for i, (image, (w, h)) in enumerate(zip(images, sizes)):
            pixels = resize_image(image, (w, h), self.resize).astype(np.float32)
            batch[i, :, :h, :w] = (torch.from_numpy(pixels).permute(2, 0, 1) - self.mean) / self.std
        return batch, sizes

    @torch.no_grad()
    def detect_batch(self, images: list) -> list[list[MaskDetection]]:
        pixels, sizes = self.preprocess(images)
        outputs = self.model(pixel_values=pixels.to(self.device, self.model.dtype))
        return [self.postprocess(outputs.class_queries_logits[i].float(), outputs.masks_queries_logits[i].float(),
                                 pixels.shape[-2:], sizes[i], images[i].size) for i in range(len(images))]

    def postprocess(self, class_logits: torch.Tensor, mask_logits: torch.Tensor, input_size, scaled_size,
                    original_size) -> list[MaskDetection]:
        """Per-query instances of one image: the top (query, class) pairs by class probability, each with its own
        mask, score = class probability x mean mask probability inside the mask, box from the mask."""
        num_classes = class_logits.shape[1] - 1
        probs = class_logits.softmax(-1)[:, :-1]
        top, index = probs.flatten().topk(min(self.max_per_image, probs.numel()))
        queries, labels = index // num_classes, index % num_classes
        (w, h), (width, height) = scaled_size, original_size
        masks = torch.nn.functional.interpolate(mask_logits[queries][None], size=tuple(input_size), mode="bilinear",
                                                align_corners=False)[0, :, :h, :w]
        masks = torch.nn.functional.interpolate(masks[None], size=(height, width), mode="bilinear",
                                                align_corners=False)[0].sigmoid()
        binary = masks > 0.5
        mask_scores = (masks * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
        scores = (top * mask_scores).cpu()
        boxes = mask_boxes(binary.cpu())
        binary = binary.cpu().numpy()
        out = []
        for j in range(len(scores)):
            name = self.class_names.get(int(labels[j]))
            if name is not None:
                out.append(MaskDetection(name, float(scores[j]), tuple(boxes[j].tolist()), binary[j]))
        return out

    def classify_colors(self, image, detections: list[MaskDetection], class_name: str) -> list[str]:
        return self.colors.classify(image, detections, class_name)


class ClipColorClassifier:
    """Zero-shot colour classification with CLIP, as GenEval does it (mask on #999999, crop to the box)."""

    def __init__(self, model_id: str = DEFAULT_CLIP, device=None, dtype: torch.dtype = torch.float32,
                 preprocess: str = "open_clip"):
        from transformers import AutoProcessor, CLIPModel

        check_choice(preprocess, CLIP_PREPROCESS, "--clip_preprocess")
        self.preprocess = preprocess

        self.device = torch.device(device or "cpu")
        self.model = _load(lambda m: CLIPModel.from_pretrained(m, dtype=dtype), model_id, "--clip_model")
        self.model = self.model.to(self.device).eval()
        self.processor = _load(AutoProcessor.from_pretrained, model_id, "--clip_model")
        self.classifiers: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def classifier(self, class_name: str) -> torch.Tensor:
        """[10, D]: per colour, the normalised mean of the normalised embeddings of the three templates."""
        if class_name not in self.classifiers:
            weights = []
            for color in COLORS:
                texts = [t.format(c=color, obj=class_name) for t in TEMPLATES]
                tokens = self.processor.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
                embedding = self.model.get_text_features(**tokens).pooler_output.float()
                embedding = torch.nn.functional.normalize(embedding, dim=-1).mean(0)
                weights.append(torch.nn.functional.normalize(embedding, dim=0))
            self.classifiers[class_name] = torch.stack(weights)
        return self.classifiers[class_name]

    @staticmethod
    def crop(image, detection) -> "object":
        """The object's mask pasted on a #999999 background, cropped to its box (GenEval's ImageCrops)."""
        from PIL import Image

        image = image.convert("RGB")
        if getattr(detection, "mask", None) is not None:
            mask = Image.fromarray(np.asarray(detection.mask, dtype=np.uint8) * 255)
            image = Image.composite(image, Image.new("RGB", image.size, BACKGROUND), mask)
        return image.crop(tuple(detection.bbox[:4]))

    def pixels(self, crops: list) -> torch.Tensor:
        """CLIP's input for the crops: open_clip's preprocessing (GenEval's) or transformers' CLIPImageProcessor."""
        processor = self.processor.image_processor
        if self.preprocess == "transformers":
            return processor(images=crops, return_tensors="pt")["pixel_values"]
        crop = processor.crop_size
        size = crop if isinstance(crop, int) else crop["height"]
        return open_clip_pixels(crops, int(size), processor.image_mean, processor.image_std)

    @torch.no_grad()
    def classify(self, image, detections: list, class_name: str) -> list[str]:
        if not detections:
            return []
        crops = [self.crop(image, d) for d in detections]
        pixels = self.pixels(crops)
        features = self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype)).pooler_output
        logits = torch.nn.functional.normalize(features.float(), dim=-1) @ self.classifier(class_name).T
        return [COLORS[i] for i in logits.argmax(-1).tolist()]


def load_detector(name: str, detector_model: str = DEFAULT_DETECTOR, clip_model: str = DEFAULT_CLIP, device=None,
                  dtype: torch.dtype = torch.float32, test_scale: tuple[int, int] = TEST_SCALE, resize: str = "cv2",
                  clip_preprocess: str = "open_clip"):
    """"mask2former" (GenEval's detector on transformers) or "toy" (the toy world's analytic detector)."""
    if name == "toy":
        from toyworld.detector import ShapeDetector

        return ShapeDetector()
    if name == "mask2former":
        return Mask2FormerDetector(detector_model, clip_model, device, dtype, test_scale=test_scale, resize=resize,
                                   clip_preprocess=clip_preprocess)
    from common.cli import UsageError

    raise UsageError(f"--detector {name!r}: choose mask2former or toy")
