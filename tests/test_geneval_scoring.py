"""GenEval scoring in the project's environment: the rules engine on hand-made detections, the Mask2Former and CLIP
adapters on tiny random models, and evaluate_geneval.py (resume, sharding, the toy detector through the same code)."""

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.geneval import Shard, write_prompt
from evaluation.geneval_rules import (COLORS, Detector, evaluate, keep_detections, relative_position, summarize)
from evaluation.scoring import score_run

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Det:
    class_name: str
    score: float
    bbox: tuple
    color: str = "red"
    mask: np.ndarray = None


def box(cx, cy, size=10):
    return (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)


def colors_of(found, name):
    return [d.color for d in found]


def judge(dets, metadata):
    return evaluate(keep_detections(dets, metadata["tag"]), metadata, colors_of)


# ----- the rules -----
def test_thresholds_are_strict_and_higher_for_counting_prompts():
    single = {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}
    assert not judge([Det("cat", 0.3, box(5, 5))], single)[0]  # GenEval keeps score > 0.3
    assert judge([Det("cat", 0.31, box(5, 5))], single)[0]
    counting = {"tag": "counting", "include": [{"class": "cat", "count": 2}],
                "exclude": [{"class": "cat", "count": 3}], "prompt": "a photo of two cats"}
    cats = [Det("cat", 0.95, box(5, 5)), Det("cat", 0.95, box(30, 5))]
    assert judge(cats, counting)[0]
    assert judge(cats + [Det("cat", 0.9, box(50, 5))], counting)[0]  # 0.9 is not > 0.9: not counted
    correct, reasons = judge(cats + [Det("cat", 0.91, box(50, 5))], counting)
    assert not correct and reasons == ["expected cat<3, found 3"]
    assert not judge([cats[0], Det("cat", 0.85, box(30, 5))], counting)[0]  # 0.85 counts for others, not here


def test_at_most_16_per_class_by_score_and_no_nms():
    many = [Det("cup", 0.4 + i / 100, box(5, 5)) for i in range(20)]  # identical boxes: no NMS merges them
    kept = keep_detections(many, "two_object")
    assert len(kept["cup"]) == 16 and [d.score for d in kept["cup"]] == sorted((d.score for d in many),
                                                                             reverse=True)[:16]
    counting = {"tag": "counting", "include": [{"class": "cup", "count": 2}], "exclude": [{"class": "cup", "count": 3}]}
    overlapping = [Det("cup", 0.95, box(5, 5)), Det("cup", 0.95, box(5, 5))]
    assert evaluate(keep_detections(overlapping, "counting"), counting, colors_of)[0]


def test_colours_are_checked_on_the_top_count_objects_only():
    metadata = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "blue"}]}
    blue_first = [Det("car", 0.9, box(5, 5), "blue"), Det("car", 0.8, box(30, 5), "red")]
    assert judge(blue_first, metadata)[0]
    correct, reasons = judge([Det("car", 0.9, box(5, 5), "red"), Det("car", 0.8, box(30, 5), "blue")], metadata)
    assert not correct and reasons == ["expected blue car>=1, found 0 blue; and 1 red"]
    pair = {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                             {"class": "dog", "count": 1, "color": "black"}]}
    assert judge([Det("car", 0.9, box(5, 5), "red"), Det("dog", 0.9, box(30, 5), "black")], pair)[0]
    assert not judge([Det("car", 0.9, box(5, 5), "black"), Det("dog", 0.9, box(30, 5), "red")], pair)[0]


@pytest.mark.parametrize("relation,dx,dy", [("left of", -30, 0), ("right of", 30, 0), ("above", 0, -30),
                                            ("below", 0, 30)])
def test_each_position_direction(relation, dx, dy):
    metadata = {"tag": "position", "include": [{"class": "dog", "count": 1},
                                               {"class": "cat", "count": 1, "position": [relation, 0]}]}
    dog = Det("dog", 0.9, box(50, 50))
    assert judge([dog, Det("cat", 0.9, box(50 + dx, 50 + dy))], metadata)[0]
    assert not judge([dog, Det("cat", 0.9, box(50 - dx, 50 - dy))], metadata)[0]
    assert relative_position(box(50 + dx, 50 + dy), box(50, 50)) == {relation}


def test_position_margin_edge_and_missing_objects():
    # two 10 px boxes: the offset is shrunk by 0.1 x (10 + 10) = 2 px; what is left, over the raw offset, must
    # exceed 0.5, so a horizontal offset needs more than 4 px
    assert relative_position(box(48.5, 50), box(50, 50)) == set()  # nothing left after the shrink
    assert relative_position(box(46.1, 50), box(50, 50)) == set()  # 1.9 / 3.9 < 0.5
    assert relative_position(box(45.9, 50), box(50, 50)) == {"left of"}  # 2.1 / 4.1 > 0.5
    # the direction test: |dx| of the shrunk offset over the raw offset length must exceed 0.5
    assert relative_position(box(40, 44), box(50, 50)) == {"left of"}  # dy: 4 / 11.7 < 0.5
    assert relative_position(box(40, 40), box(50, 50)) == {"left of", "above"}
    assert relative_position(box(30, 45), box(50, 50)) == {"left of"}
    metadata = {"tag": "position", "include": [{"class": "dog", "count": 1},
                                               {"class": "cat", "count": 1, "position": ["left of", 0]}]}
    correct, reasons = judge([Det("cat", 0.9, box(10, 50))], metadata)
    assert not correct and reasons == ["expected dog>=1, found 0", "no target for cat to be left of"]
    assert not judge([], {"tag": "single_object", "include": [{"class": "cat", "count": 1}]})[0]


def test_summary_is_summary_scores():
    records = [{"tag": t, "correct": c, "metadata": m} for t, c, m in [
        ("single_object", True, "a"), ("single_object", False, "a"), ("counting", False, "b"),
        ("counting", False, "b"), ("colors", True, "c"), ("colors", True, "d")]]
    summary = summarize(records)
    assert summary["categories"] == {"single_object": 0.5, "counting": 0.0, "colors": 1.0}
    assert summary["overall"] == pytest.approx(0.5) and summary["num_prompts"] == 4
    assert summary["correct_images"] == pytest.approx(0.5) and summary["correct_prompts"] == pytest.approx(0.75)


# ----- the adapters on tiny random models -----
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from evaluation.tiny_models import build_tiny_clip, build_tiny_mask2former

    root = tmp_path_factory.mktemp("geneval_models")
    return build_tiny_mask2former(root / "mask2former"), build_tiny_clip(root / "clip")


@pytest.fixture(scope="module")
def detector(tiny_models):
    from evaluation.detectors import Mask2FormerDetector

    return Mask2FormerDetector(str(tiny_models[0]), str(tiny_models[1]), test_scale=(133, 80))


def test_mask2former_adapter_shapes_names_and_test_time_resize(detector):
    from evaluation.detectors import resized_size

    assert resized_size(512, 512) == (800, 800) and resized_size(640, 480) == (1067, 800)
    assert resized_size(2000, 500) == (1333, 333)
    assert detector.class_names[3] == "computer keyboard" and detector.class_names[5] == "tv remote"
    images = [Image.new("RGB", (64, 64), (200, 20, 20)), Image.new("RGB", (96, 48), (20, 20, 200))]
    pixels, sizes = detector.preprocess(images)
    assert sizes == [(80, 80), (133, 67)] and pixels.shape == (2, 3, 96, 160)  # padded to multiples of 32
    assert (pixels[0, :, 80:, :] == 0).all() and (pixels[1, :, 67:, :] == 0).all()
    out = detector.detect_batch(images)
    assert [len(o) for o in out] == [12 * 8, 12 * 8]  # every (query, class) pair up to 100, no threshold yet
    for detections, image in zip(out, images):
        for d in detections:
            assert d.mask.shape == image.size[::-1] and 0 <= d.score <= 1
            assert 0 <= d.bbox[0] <= d.bbox[2] <= image.width and 0 <= d.bbox[1] <= d.bbox[3] <= image.height


def test_mask2former_scores_are_class_probability_times_mask_probability(detector):
    """Hand-made logits: score = softmax class probability (no-object excluded) x mean sigmoid in the binary mask,
    box = the mask's extent, one instance per (query, class) pair even where masks overlap; counting prompts keep
    only scores above 0.9."""
    num_classes = 8
    class_logits = torch.full((12, num_classes + 1), -20.0)
    class_logits[0, 3] = 5.0  # query 0: keyboard
    class_logits[1, 0] = 5.0  # query 1: person, overlapping query 0
    masks = torch.full((12, 8, 8), -10.0)
    masks[0, 2:6, 1:4] = 4.0
    masks[1, 3:7, 2:5] = 1.0
    out = detector.postprocess(class_logits, masks, (8, 8), (8, 8), (8, 8))
    by_name = {d.class_name: d for d in out if d.score > 0.3}
    assert set(by_name) == {"computer keyboard", "person"}
    p = torch.softmax(class_logits[0], -1)[3].item()
    keyboard = by_name["computer keyboard"]
    assert math.isclose(keyboard.score, p * torch.sigmoid(torch.tensor(4.0)).item(), rel_tol=1e-4)  # 0.975
    assert math.isclose(by_name["person"].score, p * torch.sigmoid(torch.tensor(1.0)).item(), rel_tol=1e-4)  # 0.72
    assert keyboard.bbox == (1.0, 2.0, 4.0, 6.0) and keyboard.mask.sum() == 12
    assert by_name["person"].bbox == (2.0, 3.0, 5.0, 7.0)  # the overlap is not given to one instance only
    counting = keep_detections(out, "counting", detector.thresholds)  # > 0.9 for counting prompts
    assert {k: len(v) for k, v in counting.items()} == {"computer keyboard": 1}
    single = keep_detections(out, "single_object", detector.thresholds)  # > 0.3 otherwise
    assert {k: len(v) for k, v in single.items()} == {"computer keyboard": 1, "person": 1}


def test_mask2former_masks_are_cropped_to_the_image_then_resized_to_its_original_size(detector):
    """Mask logits over the padded input: the image's part (its resized size, top left) is cut out first, then
    resized to the original size; a mask in the padding vanishes. (Resizing first would keep it and halve the
    image's mask.)"""
    class_logits = torch.full((12, 9), -20.0)
    class_logits[0, 3] = 5.0
    class_logits[1, 0] = 5.0
    masks = torch.full((12, 16, 16), -10.0)
    masks[0, 0:4, 0:4] = 10.0  # inside the image (its resized size is 8 x 8 in the 16 x 16 padded input)
    masks[1, 8:16, 8:16] = 10.0  # padding only
    out = detector.postprocess(class_logits, masks, (16, 16), (8, 8), (32, 32))
    by_name = {d.class_name: d for d in out if d.score > 0.3}
    assert set(by_name) == {"computer keyboard"}
    keyboard = by_name["computer keyboard"]
    assert keyboard.mask.shape == (32, 32) and keyboard.bbox == (0.0, 0.0, 16.0, 16.0)
    mask = keyboard.mask  # the 4 x 4 block of the 8 x 8 image, x4: 16 x 16 (bilinear leaves its far corner out)
    assert mask[:15, :15].all() and mask[:16, :16].sum() == 255 and not mask[16:].any() and not mask[:, 16:].any()


def test_test_time_resize_is_cv2_bilinear_without_antialiasing(detector):
    """GenEval's evaluator resizes with mmcv (cv2 INTER_LINEAR on the uint8 image): halving averages 2 x 2 blocks;
    PIL's bilinear filter antialiases over 4 x 4. Pixels pinned by hand."""
    from evaluation.detectors import resize_image

    row = np.array([0, 40, 100, 180], dtype=np.uint8)
    image = Image.fromarray(np.repeat(np.stack([row] * 4)[..., None], 3, axis=2))
    assert (resize_image(image, (2, 2))[..., 0] == [[20, 140], [20, 140]]).all()
    assert not (resize_image(image, (2, 2), "pil")[..., 0] == [[20, 140], [20, 140]]).all()
    up = Image.fromarray(np.repeat(np.array([[0, 200]], dtype=np.uint8)[..., None], 3, axis=2))
    assert (resize_image(up, (4, 1))[0, :, 0] == [0, 50, 150, 200]).all()  # half-pixel centres, edges clamped
    # the detector's own path: a 160 x 160 image into its 133 x 80 test scale is halved the same way
    big = Image.fromarray(np.tile(np.repeat(np.stack([row] * 4)[..., None], 3, axis=2), (40, 40, 1)))
    pixels, sizes = detector.preprocess([big])
    assert sizes == [(80, 80)]
    expected = (torch.tensor([[20.0, 140.0] * 40] * 80)[None] - detector.mean) / detector.std
    assert torch.allclose(pixels[0, :, :80, :80], expected, atol=1e-5)


def test_clip_crops_are_preprocessed_like_open_clip(detector):
    """open_clip (GenEval's CLIP): bicubic resize of the shorter side to 224, centre crop at round((H - 224) / 2)
    (torchvision's rounding: 2 for a 227-pixel side, where transformers' processor takes 1)."""
    from evaluation.detectors import open_clip_pixels

    colors = detector.colors
    processor = colors.processor.image_processor
    size = processor.crop_size["height"]
    rng = np.random.default_rng(0)
    tall = rng.integers(0, 256, (size + 3, size, 3), dtype=np.uint8)
    mean = torch.tensor(processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_std).view(3, 1, 1)
    expected = (torch.from_numpy(tall[2:2 + size].astype(np.float32) / 255).permute(2, 0, 1) - mean) / std
    ours = colors.pixels([Image.fromarray(tall)])
    assert ours.shape == (1, 3, size, size) and torch.allclose(ours[0], expected, atol=1e-6)
    theirs = processor(images=[Image.fromarray(tall)], return_tensors="pt")["pixel_values"]
    assert not torch.allclose(theirs[0], expected, atol=1e-3)  # the option that differs is not the default
    small = Image.fromarray(rng.integers(0, 256, (20, 10, 3), dtype=np.uint8))  # w 10, h 20 -> 224 x 448
    resized = np.asarray(small.resize((size, 2 * size), Image.BICUBIC), dtype=np.float32) / 255
    top = int(round(size / 2))
    expected = (torch.from_numpy(resized[top:top + size]).permute(2, 0, 1) - mean) / std
    assert torch.allclose(open_clip_pixels([small], size, processor.image_mean, processor.image_std)[0], expected,
                          atol=1e-6)


def test_clip_colour_crop_pastes_the_mask_on_999999_and_crops_to_the_box(detector):
    from evaluation.detectors import ClipColorClassifier

    image = Image.new("RGB", (20, 10), (255, 0, 0))
    mask = np.zeros((10, 20), dtype=bool)
    mask[2:6, 3:7] = True
    crop = np.asarray(ClipColorClassifier.crop(image, Det("cup", 0.9, (2, 1, 9, 8), mask=mask)))
    assert crop.shape == (7, 7, 3)
    assert (crop[1:5, 1:5] == (255, 0, 0)).all()  # the object
    assert (crop[0] == 0x99).all() and (crop[:, 6] == 0x99).all()  # the background outside the mask
    colors = detector.classify_colors(image, [Det("cup", 0.9, (2, 1, 9, 8), mask=mask)] * 3, "cup")
    assert len(colors) == 3 and set(colors) <= set(COLORS)
    weights = detector.colors.classifier("cup")
    assert weights.shape == (10, 16) and torch.allclose(weights.norm(dim=-1), torch.ones(10), atol=1e-5)


# ----- scoring runs: the toy detector and Mask2Former through the same code; resume; shards -----
def toy_run(folder: Path, per_tag: int = 2) -> Path:
    from toyworld import world

    prompts = world.eval_metadata(per_tag, seed=0)
    for i, metadata in enumerate(prompts):
        rng = np.random.default_rng([3, i])
        write_prompt(folder, i, metadata, [world.render(metadata, rng, 64) for _ in range(2)])
    return folder


def test_scoring_resumes_and_shards_give_the_straight_results(tmp_path):
    from toyworld.detector import ShapeDetector

    run = toy_run(tmp_path / "run")
    straight = score_run(run, ShapeDetector(), tmp_path / "straight.jsonl", progress=False)
    assert straight["overall"] == 1.0 and straight["num_images"] == 24  # clean renders
    # a killed run: the part file holds 5 finished lines and a torn one; the rerun scores only the rest
    lines = (tmp_path / "straight.jsonl").read_text().splitlines()
    part = tmp_path / ".resumed.jsonl.part0-of-1"
    part.write_text("\n".join(lines[:5]) + "\n" + lines[5][:40])
    calls = []

    class Counting(ShapeDetector):
        def detect_batch(self, images):
            calls.append(len(images))
            return super().detect_batch(images)

    resumed = score_run(run, Counting(), tmp_path / "resumed.jsonl", batch_size=4, progress=False)
    assert sum(calls) == 24 - 5 and resumed == {**straight}
    assert (tmp_path / "resumed.jsonl").read_text() == (tmp_path / "straight.jsonl").read_text()
    assert not list(tmp_path.glob(".resumed.jsonl.part*"))  # merged and removed
    # two shards: the first finds the second missing and leaves the merge to it
    assert score_run(run, ShapeDetector(), tmp_path / "sharded.jsonl", Shard(0, 2), progress=False) is None
    sharded = score_run(run, ShapeDetector(), tmp_path / "sharded.jsonl", Shard(1, 2), progress=False)
    assert sharded == straight
    assert (tmp_path / "sharded.jsonl").read_text() == (tmp_path / "straight.jsonl").read_text()
    record = json.loads(lines[0])
    assert set(record) == {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}


def test_evaluate_geneval_cli_with_mask2former_and_toy(tiny_models, tmp_path):
    run = toy_run(tmp_path / "run", per_tag=1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "evaluate_geneval.py", str(run)]
    result = subprocess.run(base + ["--detector_model", str(tiny_models[0]), "--clip_model", str(tiny_models[1]),
                                    "--test_scale", "133", "80", "--batch_size", "4"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "results_summary.json").read_text())
    assert summary["detector"] == "mask2former" and summary["num_images"] == 12
    assert "Overall score (avg. over tasks)" in result.stdout
    records = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert len(records) == 12 and all(set(json.loads(r["details"])) <= {"person", "cat", "dog", "computer keyboard",
                                                                          "computer mouse", "tv remote", "cup",
                                                                          "bench"} for r in records)
    toy = subprocess.run(base + ["--detector", "toy", "--outfile", str(tmp_path / "toy.jsonl")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert toy.returncode == 0, toy.stderr[-3000:]
    assert json.loads((tmp_path / "toy_summary.json").read_text())["overall"] == 1.0


def test_the_toy_detector_is_a_geneval_detector():
    from toyworld.detector import ShapeDetector

    detector: Detector = ShapeDetector()
    assert detector.thresholds == (0.0, 0.0) and detector.name == "toy"
