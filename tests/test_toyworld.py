"""The toy world: generator, analytic detector and GenEval-rules scorer agree with each other and with GenEval."""

import copy
import json
from dataclasses import replace
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from evaluation.geneval import load_prompts, write_prompt
from toyworld import scorer, world
from toyworld.detector import Detection, ShapeDetector, clean_labels, connected_components
from toyworld.scorer import evaluate, relative_position, score_folder
from toyworld.world import BACKGROUND, TAGS, PlacedObject

GENEVAL_METADATA = Path(__file__).resolve().parent.parent / "evaluation" / "evaluation_metadata.jsonl"


def _scene(index: int, resolution: int) -> tuple[dict, list[PlacedObject], np.random.Generator]:
    rng = np.random.default_rng([123, resolution, index])
    metadata = world.sample_metadata(TAGS[index % len(TAGS)], rng)
    return metadata, world.layout(metadata, rng, resolution), rng


def _blur_and_noise(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Mild degradation of a generated image: Gaussian blur of 1 px at 64 px plus noise of std 8."""
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(image.width / 64)), dtype=np.float64)
    return Image.fromarray(np.clip(blurred + rng.normal(0, 8, blurred.shape), 0, 255).astype(np.uint8))


def _recovered(objects: list[PlacedObject], detections: list[Detection]) -> int:
    """How many objects have their own detection of the right class and colour near their box centre."""
    unused, hits = list(detections), 0
    for obj in objects:
        for d in unused:
            box_cx, box_cy = (d.bbox[0] + d.bbox[2]) / 2, (d.bbox[1] + d.bbox[3]) / 2
            if (d.class_name, d.color) == (obj.shape, obj.color) and \
                    max(abs(box_cx - obj.cx), abs(box_cy - obj.cy)) < obj.size / 4:
                unused.remove(d)
                hits += 1
                break
    return hits


def _agreement(resolution: int, num_images: int, degrade: bool) -> tuple[float, float, int]:
    """(object recovery rate, rate of images with exactly the right objects, number of objects)."""
    detector = ShapeDetector()
    objects_total = objects_found = exact_images = 0
    for index in range(num_images):
        _, objects, rng = _scene(index, resolution)
        image = world.draw(objects, resolution)
        detections = detector.detect(_blur_and_noise(image, rng) if degrade else image)
        found = _recovered(objects, detections)
        objects_total += len(objects)
        objects_found += found
        exact_images += found == len(objects) == len(detections)
    return objects_found / objects_total, exact_images / num_images, objects_total


@pytest.mark.parametrize("resolution, num_images, degrade", [(64, 240, False), (32, 90, False), (64, 120, True)])
def test_detector_recovers_the_generated_objects(resolution, num_images, degrade):
    object_rate, image_rate, num_objects = _agreement(resolution, num_images, degrade)
    report = f"{resolution}px{' blur+noise' if degrade else ''}: objects {object_rate:.4f} of {num_objects}, " \
             f"exact images {image_rate:.4f} of {num_images}"
    print(report)
    assert num_objects >= (300 if resolution == 64 and not degrade else 100)
    assert object_rate >= 0.99 and image_rate >= 0.99, report


def test_detection_fields_and_rejections():
    detector = ShapeDetector()
    square = world.draw([PlacedObject("square", "red", 32.0, 32.0, 20.0)], 64)
    (detection,) = detector.detect(square)
    assert (detection.class_name, detection.color, detection.bbox) == ("square", "red", (22, 22, 42, 42))
    assert detection.area == 400
    assert detection.centroid == (32.0, 32.0) and detection.score > 0.95
    assert detector.detect(Image.new("RGB", (64, 64), BACKGROUND)) == []
    off_palette = Image.new("RGB", (64, 64), BACKGROUND)
    off_palette.paste((128, 128, 128), (20, 20, 40, 40))  # gray is no palette colour
    assert detector.detect(off_palette) == []
    speckled = np.array(Image.new("RGB", (64, 64), BACKGROUND))
    speckled[np.random.default_rng(0).random((64, 64)) < 0.02] = world.COLORS["blue"]  # isolated pixels
    assert detector.detect(Image.fromarray(speckled)) == []
    bar = Image.new("RGB", (64, 64), BACKGROUND)
    bar.paste(world.COLORS["green"], (10, 28, 54, 36))  # far too elongated for any shape
    assert detector.detect(bar) == []


def test_cleanup_removes_specks_and_fills_pinholes_but_keeps_corners():
    labels = np.zeros((12, 12), dtype=np.int64)
    labels[2:8, 2:8] = 1  # a square ...
    labels[4, 4] = 0  # ... with a pinhole
    labels[8, 8] = 1  # ... and a speck touching its corner diagonally
    labels[10, 2] = 2  # a lone speck
    cleaned = clean_labels(labels, num_labels=3)
    expected = np.zeros_like(labels)
    expected[2:8, 2:8] = 1
    assert np.array_equal(cleaned, expected)


def test_connected_components_are_4_connected_per_label():
    labels = np.array([[1, 1, 0, 2],
                       [0, 1, 0, 2],
                       [0, 0, 1, 0],
                       [3, 3, 0, 1]])
    components = connected_components(labels)
    assert (components[labels == 0] == -1).all()
    assert components[0, 0] == components[0, 1] == components[1, 1]
    assert len({components[0, 0], components[2, 2], components[3, 3], components[0, 3], components[3, 0]}) == 5
    assert components.max() == 5 - 1


def _det(name: str, color: str, cx: float, cy: float, size: float = 10, score: float = 0.9) -> Detection:
    box = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
    return Detection(name, color, box, (cx, cy), int(size * size), score)


COUNTING = {"tag": "counting", "include": [{"class": "circle", "count": 3}],
            "exclude": [{"class": "circle", "count": 4}], "prompt": "a photo of three circles"}


def test_counting_needs_exactly_n_through_exclude():
    circles = [_det("circle", "red", 10 + 15 * i, 10) for i in range(5)]
    assert evaluate(circles[:3], COUNTING)[0]
    assert evaluate(circles[:3] + [_det("square", "red", 50, 50)], COUNTING)[0]
    assert not evaluate(circles[:2], COUNTING)[0]
    correct, reasons = evaluate(circles[:4], COUNTING)
    assert not correct and reasons == ["expected circle<4, found 4"]
    include_only = {k: v for k, v in COUNTING.items() if k != "exclude"}
    assert evaluate(circles[:4], include_only)[0]  # include alone means "at least"


def test_two_object_requires_both_and_exclude_any_class():
    metadata = {"tag": "two_object", "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1}],
                "prompt": "a photo of a circle and a square"}
    circle, square = _det("circle", "red", 10, 10), _det("square", "blue", 40, 40)
    assert evaluate([circle, square], metadata)[0]
    assert not evaluate([circle], metadata)[0] and not evaluate([square], metadata)[0]
    excluded = {**metadata, "exclude": [{"class": "triangle", "count": 1}]}
    assert not evaluate([circle, square, _det("triangle", "red", 50, 10)], excluded)[0]


def test_colors_are_checked_on_the_top_scoring_objects():
    metadata = {"tag": "colors", "include": [{"class": "square", "count": 1, "color": "blue"}],
                "prompt": "a photo of a blue square"}
    assert evaluate([_det("square", "blue", 20, 20)], metadata)[0]
    assert not evaluate([_det("square", "red", 20, 20)], metadata)[0]
    assert not evaluate([_det("circle", "blue", 20, 20)], metadata)[0]
    red_first = [_det("square", "red", 20, 20, score=0.9), _det("square", "blue", 50, 50, score=0.8)]
    assert not evaluate(red_first, metadata)[0]  # GenEval checks the most confident square only
    assert evaluate([_det("square", "red", 20, 20, score=0.7), red_first[1]], metadata)[0]
    attr = {"tag": "color_attr", "include": [{"class": "circle", "count": 1, "color": "red"},
                                             {"class": "square", "count": 1, "color": "blue"}],
            "prompt": "a photo of a red circle and a blue square"}
    assert evaluate([_det("circle", "red", 10, 10), _det("square", "blue", 40, 40)], attr)[0]
    assert not evaluate([_det("circle", "blue", 10, 10), _det("square", "red", 40, 40)], attr)[0]


def _position(relation: str) -> dict:
    return {"tag": "position", "include": [{"class": "square", "count": 1},
                                           {"class": "circle", "count": 1, "position": [relation, 0]}],
            "prompt": f"a photo of a circle {relation} a square"}


@pytest.mark.parametrize("relation, offset", [("left of", (-20, 0)), ("right of", (20, 0)),
                                              ("above", (0, -20)), ("below", (0, 20))])
def test_position_relations(relation, offset):
    square = _det("square", "red", 32, 32)
    circle = _det("circle", "blue", 32 + offset[0], 32 + offset[1])
    mirrored = _det("circle", "blue", 32 - offset[0], 32 - offset[1])
    assert evaluate([square, circle], _position(relation))[0]
    assert not evaluate([square, mirrored], _position(relation))[0]
    assert relative_position(circle.bbox, square.bbox) == {relation}


def test_position_near_ties_and_missing_target_fail():
    # Widths 10 + 10: offsets shrink by 2 px and must keep over half their length, so |dx| > 4 px.
    square = _det("square", "red", 32, 32)
    assert relative_position((0, 0, 10, 10), (1.5, 0, 11.5, 10)) == set()
    assert not evaluate([square, _det("circle", "blue", 30.5, 32)], _position("left of"))[0]
    assert not evaluate([square, _det("circle", "blue", 28.5, 32)], _position("left of"))[0]
    assert evaluate([square, _det("circle", "blue", 27.5, 32)], _position("left of"))[0]
    assert not evaluate([square, _det("circle", "blue", 27, 2)], _position("left of"))[0]  # mostly above
    correct, reasons = evaluate([_det("circle", "blue", 10, 32)], _position("left of"))
    assert not correct and reasons == ["expected square>=1, found 0", "no target for circle to be left of"]


def _violate(metadata: dict) -> dict:
    """Metadata for an image that breaks `metadata` in the way its category tests."""
    wrong = copy.deepcopy(metadata)
    first = wrong["include"][0]
    other_shape = next(s for s in world.SHAPES if s not in {e["class"] for e in wrong["include"]})
    other_color = {e.get("color") for e in wrong["include"]}
    if wrong["tag"] == "single_object":
        first["class"] = other_shape
    elif wrong["tag"] == "two_object":
        wrong["include"] = [first]
    elif wrong["tag"] == "counting":
        first["count"] += 1
    elif wrong["tag"] in ("colors", "color_attr"):
        first["color"] = next(c for c in world.COLORS if c not in other_color)
    elif wrong["tag"] == "position":
        relation = wrong["include"][1]["position"][0]
        opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        wrong["include"][1]["position"][0] = opposite[relation]
    return wrong


def _write_run(run: Path, prompts: list[dict], resolution: int, image_for) -> None:
    for index, metadata in enumerate(prompts):
        rngs = [np.random.default_rng([7, index, j]) for j in range(2)]
        write_prompt(run, index, metadata, [image_for(metadata, rng, resolution) for rng in rngs])


@pytest.mark.parametrize("resolution", [64, 32])
def test_scorer_on_clean_renders_scores_one(tmp_path, resolution):
    prompts = world.eval_metadata(num_prompts_per_tag=3, seed=0)
    _write_run(tmp_path / "run", prompts, resolution, world.render)
    summary = score_folder(tmp_path / "run", per_image_path=tmp_path / "results.jsonl")
    assert {"overall", "categories", "num_images", "counts", "num_prompts", "correct_images"} <= set(summary)
    assert summary["categories"] == {tag: 1.0 for tag in TAGS} and summary["overall"] == 1.0
    assert summary["num_images"] == 2 * len(prompts) == 36
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 36 and {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"} <= set(lines[0])
    assert json.loads(lines[0]["metadata"]) == prompts[0]


def test_scorer_gives_zero_to_images_that_violate_the_prompt(tmp_path):
    prompts = world.eval_metadata(num_prompts_per_tag=3, seed=0)
    _write_run(tmp_path / "blank", prompts, 64, lambda m, rng, r: Image.new("RGB", (r, r), BACKGROUND))
    _write_run(tmp_path / "wrong", prompts, 64, lambda m, rng, r: world.render(_violate(m), rng, r))
    for run in ("blank", "wrong"):
        summary = score_folder(tmp_path / run)
        assert summary["categories"] == {tag: 0.0 for tag in TAGS} and summary["overall"] == 0.0, run


def test_scorer_cli_and_overall_is_the_mean_over_tags(tmp_path, capsys):
    prompts = world.eval_metadata(num_prompts_per_tag=2, seed=0)
    blank = Image.new("RGB", (64, 64), BACKGROUND)
    _write_run(tmp_path / "run", prompts, 64,
               lambda m, rng, r: world.render(m, rng, r) if m["tag"] in ("counting", "colors") else blank)
    (tmp_path / "run" / "run_config.json").write_text("{}")  # files next to the prompt folders are ignored
    scorer.main([str(tmp_path / "run"), "--out", str(tmp_path / "scores.json")])
    summary = json.loads((tmp_path / "scores.json").read_text())
    assert summary["overall"] == pytest.approx(2 / 6) and summary["categories"]["counting"] == 1.0
    assert "Overall score (avg. over tasks): 0.33333" in capsys.readouterr().out
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(ValueError, match="not a GenEval-layout folder"):
        score_folder(tmp_path / "empty_run")


def test_eval_metadata_matches_geneval_format_and_is_deterministic(tmp_path):
    path = tmp_path / "eval.jsonl"
    prompts = world.write_eval_metadata(path, num_prompts_per_tag=20, seed=3)
    assert [json.loads(line) for line in path.read_text().splitlines()] == prompts == load_prompts(metadata_file=path)
    assert [p["tag"] for p in prompts] == [tag for tag in TAGS for _ in range(20)]
    geneval = [json.loads(line) for line in GENEVAL_METADATA.read_text().splitlines()]
    for tag in TAGS:  # same keys, per tag and per include entry, as GenEval's own file
        ours = [p for p in prompts if p["tag"] == tag]
        theirs = [p for p in geneval if p["tag"] == tag]
        assert {tuple(p) for p in ours} == {tuple(p) for p in theirs}, tag
        assert {tuple(tuple(e) for e in p["include"]) for p in ours} == \
            {tuple(tuple(e) for e in p["include"]) for p in theirs}, tag
    for p in prompts:
        if p["tag"] == "counting":
            (include,), (exclude,) = p["include"], p["exclude"]
            assert exclude == {"class": include["class"], "count": include["count"] + 1}
            assert include["count"] in world.NUMBER_WORDS
        if p["tag"] == "position":
            target, subject = p["include"]
            assert subject["position"][1] == 0 and subject["position"][0] in world.RELATIONS
            assert p["prompt"] == f"a photo of a {subject['class']} {subject['position'][0]} a {target['class']}"
    assert world.write_eval_metadata(tmp_path / "again.jsonl", 20, seed=3) == prompts
    assert (tmp_path / "again.jsonl").read_bytes() == path.read_bytes()
    assert world.eval_metadata(20, seed=4) != prompts
    assert world.eval_metadata(5, seed=3) == [p for i, p in enumerate(prompts) if i % 20 < 5]  # stable prefixes


def test_prompts_use_number_words_and_plurals():
    rng = np.random.default_rng(0)
    counting = [world.sample_metadata("counting", rng) for _ in range(200)]
    for metadata in counting:
        count, shape = metadata["include"][0]["count"], metadata["include"][0]["class"]
        plural = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses",
                  "ring": "rings"}[shape]
        expected = {1: f"one {shape}", 2: f"two {plural}", 3: f"three {plural}", 4: f"four {plural}"}[count]
        assert metadata["prompt"] == f"a photo of {expected}"
    counts = [m["include"][0]["count"] for m in counting]
    assert set(counts) == {1, 2, 3, 4} and counts.count(1) < counts.count(2)
    with pytest.raises(ValueError, match="unknown tag"):
        world.sample_metadata("spatial", rng)


def test_words_are_matched_to_the_objects_they_describe():
    from toyworld import captions

    describe = captions.object_descriptions
    position = {"tag": "position", "prompt": "a photo of a ring below a cross",
                "include": [{"class": "cross", "count": 1}, {"class": "ring", "count": 1, "position": ["below", 0]}]}
    assert describe(position) == [{"shape": "ring", "color": None, "count": 1, "relation": "below"},
                                  {"shape": "cross", "color": None, "count": 1, "relation": "above"}]  # prompt order
    assert captions.word_objects(position) == [None, None, None, None, 0, None, None, 1]
    color_attr = {"tag": "color_attr", "prompt": "a photo of a red circle and a blue square",
                  "include": [{"class": "circle", "count": 1, "color": "red"},
                              {"class": "square", "count": 1, "color": "blue"}]}
    assert [d["color"] for d in describe(color_attr)] == ["red", "blue"]
    assert captions.word_objects(color_attr) == [None, None, None, None, 0, 0, None, None, 1, 1]
    counting = {"tag": "counting", "prompt": "a photo of three crosses", "include": [{"class": "cross", "count": 3}],
                "exclude": [{"class": "cross", "count": 4}]}
    assert describe(counting) == [{"shape": "cross", "color": None, "count": 3, "relation": None}]
    assert captions.word_objects(counting) == [None, None, None, 0, 0]
    rng = np.random.default_rng(1)
    for tag in TAGS:  # every generated prompt: each object is named by its shape word, nothing else by one
        for _ in range(50):
            metadata = world.sample_metadata(tag, rng)
            owners, words = captions.word_objects(metadata), metadata["prompt"].split()
            objects = describe(metadata)
            assert len(objects) == len(metadata["include"])
            for k, obj in enumerate(objects):
                named = [w for w, o in zip(words, owners) if o == k]
                assert obj["shape"] in named or world.PLURALS[obj["shape"]] in named
            assert all(o is None for w, o in zip(words, owners) if w in ("a", "photo", "of", "and", "left", "above"))


@pytest.mark.parametrize("resolution", [64, 32])
def test_layouts_are_inside_apart_and_keep_their_relations(resolution):
    for index in range(300):
        metadata, objects, _ = _scene(index, resolution)
        assert len(objects) == sum(e["count"] for e in metadata["include"])
        for i, obj in enumerate(objects):
            x0, y0, x1, y1 = obj.box
            assert 0 < x0 and 0 < y0 and x1 < resolution and y1 < resolution
            assert 0.25 * resolution <= obj.size <= 0.375 * resolution
            for other in objects[i + 1:]:
                assert world.boxes_apart(obj, other, world.GAP * resolution)
        for entry, obj in zip(metadata["include"], objects):
            assert obj.shape == entry["class"] and obj.color == entry.get("color", obj.color)
            if "position" in entry:
                assert entry["position"][0] in relative_position(obj.box, objects[0].box)


def test_training_examples_cycle_tags_and_are_deterministic():
    examples = [world.training_example(i, seed=5, resolution=32) for i in range(12)]
    assert [m["tag"] for m, _ in examples] == list(TAGS) * 2
    metadata, image = world.training_example(7, seed=5, resolution=32)
    assert metadata == examples[7][0] and np.array_equal(np.asarray(image), np.asarray(examples[7][1]))
    assert image.size == (32, 32) and world.training_example(7, seed=6, resolution=32)[0] != metadata


@pytest.mark.parametrize("format", world.FORMATS)
def test_dataset_loads_with_datasets(tmp_path, format):
    path = world.write_dataset(tmp_path / "data", num_images=12, resolution=32, seed=2, format=format)
    cache = str(tmp_path / "cache")
    if format == "imagefolder":
        assert path == tmp_path / "data" and (path / "metadata.jsonl").is_file()
        loaded = datasets.load_dataset("imagefolder", data_dir=str(path), split="train", cache_dir=cache)
    else:
        assert path == tmp_path / "data" / "train.parquet"
        loaded = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=cache)
        loaded = loaded.cast_column("image", datasets.Image())
    expected = [world.training_example(i, seed=2, resolution=32) for i in range(12)]
    assert loaded.column_names == ["image", "llava"] and len(loaded) == 12
    assert loaded["llava"] == [metadata["prompt"] for metadata, _ in expected]
    for row, (_, image) in zip(loaded, expected):
        assert np.array_equal(np.asarray(row["image"].convert("RGB")), np.asarray(image))


def test_world_cli(tmp_path, capsys):
    world.main(["dataset", "--output_dir", str(tmp_path / "d"), "--num_images", "3", "--format", "parquet",
                "--resolution", "32", "--caption_column", "caption"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "d" / "train.parquet")
    table = datasets.load_dataset("parquet", data_files=str(tmp_path / "d" / "train.parquet"), split="train",
                                  cache_dir=str(tmp_path / "cache"))
    assert table.column_names == ["image", "caption"] and len(table) == 3
    world.main(["eval", "--output", str(tmp_path / "eval.jsonl"), "--per_tag", "2"])
    assert len((tmp_path / "eval.jsonl").read_text().splitlines()) == 12


def test_teacher_build_saves_the_ema_weights_it_snapshots(tmp_path):
    """The saved transformer and text encoders are the EMA of the last stage, as the snapshot hook received them."""
    from safetensors.torch import load_file

    from toyworld.teacher import PRESETS, build_toy_teacher

    config = replace(PRESETS["smoke"], num_images=12, vae_steps=2, flow_steps=4, guidance_steps=0, batch=4,
                     vae_batch=2)
    snapshots = {}
    build_toy_teacher(tmp_path / "teacher", config, log=None,
                      snapshot=lambda stage, step, states: snapshots.__setitem__((stage, step), states),
                      snapshot_every=2)
    assert sorted(snapshots) == [("flow", 2), ("flow", 4)]
    for i, name in enumerate(["transformer", "text_encoder", "text_encoder_2"]):
        saved = load_file(str(next((tmp_path / "teacher" / name).glob("*.safetensors"))))
        final, earlier = snapshots[("flow", 4)][i], snapshots[("flow", 2)][i]
        assert set(saved) <= set(final)
        assert all(torch.equal(saved[k], final[k]) for k in saved), name
        assert any(not torch.equal(saved[k], earlier[k]) for k in saved), name  # the encoders trained too


@pytest.mark.parametrize("text_pretrain_steps", [0, 4])
def test_teacher_build_stopped_halfway_and_rerun_equals_one_straight_build(tmp_path, text_pretrain_steps):
    """Also with the text stage (stopped inside it too), whose encoders then stay frozen."""
    from toyworld.teacher import PRESETS, build_toy_teacher

    config = replace(PRESETS["smoke"], num_images=12, vae_steps=2, flow_steps=6, guidance_steps=4, batch=4,
                     vae_batch=2, checkpoint_every=2, text_pretrain_steps=text_pretrain_steps,
                     train_text_encoders=not text_pretrain_steps)
    build_toy_teacher(tmp_path / "straight", config, log=None)
    if text_pretrain_steps:
        assert build_toy_teacher(tmp_path / "halves", config, log=None, stop_after=2) is None  # text 0 -> 2
        assert torch.load(tmp_path / "halves" / "build" / "text.pt", weights_only=True)["step"] == 2
        # text 2 -> 4, flow 0 -> 3
        assert build_toy_teacher(tmp_path / "halves", config, log=None, stop_after=5) is None
    else:
        assert build_toy_teacher(tmp_path / "halves", config, log=None, stop_after=3) is None  # flow 0 -> 3
    # flow 3 -> 6, guidance 0 -> 2
    assert build_toy_teacher(tmp_path / "halves", config, log=None, stop_after=5) is None
    assert torch.load(tmp_path / "halves" / "build" / "guidance.pt", weights_only=True)["step"] == 2
    assert build_toy_teacher(tmp_path / "halves", config, log=None) is not None
    for folder in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        for file in (tmp_path / "straight" / folder).glob("*.safetensors"):
            assert file.read_bytes() == (tmp_path / "halves" / folder / file.name).read_bytes(), file
    with pytest.raises(ValueError, match=r"other settings: flow_steps 6 \(asked 8\); continue it with --flow_steps 6"):
        build_toy_teacher(tmp_path / "halves", replace(config, flow_steps=8), log=None)


def test_teacher_build_given_a_second_cycle_continues_and_equals_a_straight_two_cycle_build(tmp_path):
    """A finished one-cycle build rerun with --flow_cycles 2 (stopped and rerun inside the new cycle and inside its
    guidance stage) equals a straight two-cycle build; the second cycle restarts at its own peak rate and
    guidance-distils again; while it runs, the folder does not pass for a finished teacher."""
    import contextlib
    import io

    from toyworld.teacher import CLI_SETTINGS, PRESETS, SUMMARY, build_toy_teacher, main

    one = replace(PRESETS["smoke"], num_images=12, vae_steps=2, flow_steps=4, guidance_steps=2, batch=4,
                  vae_batch=2, checkpoint_every=2)  # default cycle settings, unused by one cycle
    two = replace(one, flow_cycles=2, cycle_lr=3e-4, cycle_steps=3)
    build_toy_teacher(tmp_path / "straight", two, log=None)
    build_toy_teacher(tmp_path / "grown", one, log=None)
    first = {f.name: f.read_bytes() for f in (tmp_path / "grown" / "transformer").glob("*.safetensors")}
    build = tmp_path / "grown" / "build"
    assert build_toy_teacher(tmp_path / "grown", two, log=None, stop_after=2) is None  # cycle 2: 0 -> 2
    assert not (tmp_path / "grown" / SUMMARY).exists()  # set aside: not a finished build until cycle 2 is saved
    assert json.loads((build / "toy_teacher_cycles1.json").read_text())["config"]["flow_cycles"] == 1
    # cycle 2: 2 -> 3, guidance 0 -> 1
    assert build_toy_teacher(tmp_path / "grown", two, log=None, stop_after=2) is None
    assert torch.load(build / "guidance_cycle2.pt", weights_only=True)["step"] == 1
    assert build_toy_teacher(tmp_path / "grown", two, log=None) is not None
    cycle2 = torch.load(build / "flow_cycle2.pt", weights_only=True)
    assert cycle2["step"] == 3 and len(cycle2["losses"]) == 3
    assert cycle2["schedule"]["base_lrs"] == [3e-4]  # the cycle's own peak, with a fresh schedule
    assert torch.load(build / "guidance_cycle2.pt", weights_only=True)["step"] == 2
    assert json.loads((build / "config.json").read_text())["flow_cycles"] == 2
    assert json.loads((tmp_path / "grown" / SUMMARY).read_text())["config"]["flow_cycles"] == 2
    for folder in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        for file in (tmp_path / "straight" / folder).glob("*.safetensors"):
            assert file.read_bytes() == (tmp_path / "grown" / folder / file.name).read_bytes(), file
    assert any(first[name] != (tmp_path / "grown" / "transformer" / name).read_bytes() for name in first)
    with pytest.raises(ValueError, match="continue it with --flow_cycles 2 --cycle_steps 3 --cycle_lr 0.0003,"):
        build_toy_teacher(tmp_path / "grown", one, log=None)
    with pytest.raises(ValueError, match="continue it with --cycle_lr 0.0003,"):  # restart settings are fixed now
        build_toy_teacher(tmp_path / "grown", replace(two, cycle_lr=1e-4, flow_cycles=3), log=None)
    with pytest.raises(ValueError, match="continue it with the --preset and flags it was made with"):
        build_toy_teacher(tmp_path / "grown", replace(two, text_dim=64), log=None)
    with pytest.raises(SystemExit):
        main(["--output_dir", str(tmp_path / "x"), "--preset", "smoke", "--cycle_lr", "0"])
    with contextlib.redirect_stdout(io.StringIO()) as usage, pytest.raises(SystemExit):
        main(["--help"])
    assert all(f"--{k} " in usage.getvalue() for k in CLI_SETTINGS)  # the error's suggested flags exist


def test_teacher_build_made_before_cycles_existed_is_continued(tmp_path):
    """A build whose config.json predates the cycle and text-stage settings reads as one cycle without a text
    stage and can be given a second cycle."""
    from toyworld.teacher import PRESETS, build_toy_teacher

    one = replace(PRESETS["smoke"], num_images=12, vae_steps=2, flow_steps=2, guidance_steps=0, batch=4,
                  vae_batch=2, checkpoint_every=2, cycle_steps=2)
    build_toy_teacher(tmp_path / "t", one, log=None)
    path = tmp_path / "t" / "build" / "config.json"
    newer = ("flow_cycles", "cycle_steps", "cycle_lr", "text_pretrain_steps", "text_pretrain_lr")
    old = {k: v for k, v in json.loads(path.read_text()).items() if k not in newer}
    path.write_text(json.dumps(old))
    build_toy_teacher(tmp_path / "t", one, log=None)  # the same one-cycle build: accepted
    assert build_toy_teacher(tmp_path / "t", replace(one, flow_cycles=2), log=None) is not None
    assert torch.load(tmp_path / "t" / "build" / "flow_cycle2.pt", weights_only=True)["step"] == 2


def test_text_stage_freezes_the_encoders_for_the_later_stages(tmp_path):
    """With the text stage, the saved encoders are the text stage's (EMA) result, whatever the flow stage's length."""
    from toyworld.teacher import PRESETS, build_toy_teacher

    config = replace(PRESETS["smoke"], num_images=12, vae_steps=2, flow_steps=2, guidance_steps=1, batch=4,
                     vae_batch=2, text_pretrain_steps=3, train_text_encoders=False)
    build_toy_teacher(tmp_path / "short", config, log=None)
    build_toy_teacher(tmp_path / "long", replace(config, flow_steps=5), log=None)
    summary = json.loads((tmp_path / "long" / "toy_teacher.json").read_text())
    assert 0 <= summary["text_pretrain_accuracy"] <= 1 and "text" in summary["final_losses"]
    for folder in ("text_encoder", "text_encoder_2", "transformer"):
        files = sorted((tmp_path / "short" / folder).glob("*.safetensors"))
        same = all(f.read_bytes() == (tmp_path / "long" / folder / f.name).read_bytes() for f in files)
        assert same == (folder != "transformer"), folder


def test_caption_targets_and_the_text_stage_learn_which_word_goes_with_which_object(tmp_path):
    """Swapped captions (the same words in another order) need other targets, so reading them all right needs
    encoders that see word order; a few hundred steps at the smoke size get every target right."""
    from model.tiny_flux import build_components
    from toyworld.teacher import (ATTRIBUTES, IGNORE, PRESETS, CaptionEncoder, StageRunner, caption_targets,
                                  pretrain_text_encoders)

    def entry(shape, color=None, position=None):
        return {"class": shape, "count": 1, **({"color": color} if color else {}),
                **({"position": position} if position else {})}

    metadata = [
        {"tag": "color_attr", "prompt": "a photo of a red circle and a blue square",
         "include": [entry("circle", "red"), entry("square", "blue")]},
        {"tag": "color_attr", "prompt": "a photo of a blue circle and a red square",
         "include": [entry("circle", "blue"), entry("square", "red")]},
        {"tag": "position", "prompt": "a photo of a circle left of a square",
         "include": [entry("square"), entry("circle", position=["left of", 0])]},
        {"tag": "position", "prompt": "a photo of a square left of a circle",
         "include": [entry("circle"), entry("square", position=["left of", 0])]},
        {"tag": "counting", "prompt": "a photo of two squares", "include": [{"class": "square", "count": 2}],
         "exclude": [{"class": "square", "count": 3}]},
    ]
    config = replace(PRESETS["smoke"], text_pretrain_steps=300, text_pretrain_lr=3e-3, batch=8, caption_dropout=0.2)
    components = build_components(config.dims(), config.seed)
    tokens, pooled = caption_targets(metadata[0], components["tokenizer_2"], config.max_sequence_length)
    circle = [ATTRIBUTES["shape"].index("circle"), ATTRIBUTES["color"].index("red"), 0, 0]
    square = [ATTRIBUTES["shape"].index("square"), ATTRIBUTES["color"].index("blue"), 0, 0]
    assert tokens[4:6].tolist() == [circle, circle] and tokens[8:10].tolist() == [square, square]
    assert (tokens[[0, 1, 2, 3, 6, 7, 10]] == IGNORE).all()  # "a photo of a", "and a", </s>
    assert pooled.tolist() == [2, *circle, *square]
    left = caption_targets(metadata[2], components["tokenizer_2"], config.max_sequence_length)[0]
    relations = ATTRIBUTES["relation"]
    assert left[4, 3] == relations.index("left of") and left[8, 3] == relations.index("right of")
    empty_tokens, empty_pooled = caption_targets(None, components["tokenizer_2"], config.max_sequence_length)
    assert (empty_tokens == IGNORE).all() and empty_pooled[0] == 0 and (empty_pooled[1:] == IGNORE).all()

    text = CaptionEncoder(components, [m["prompt"] for m in metadata], config.max_sequence_length)
    runner = StageRunner(tmp_path, config, torch.Generator().manual_seed(0), len(metadata),
                         [components["transformer"], *text.encoders()], None, None, 1000, None)
    losses, accuracy = pretrain_text_encoders(text, metadata, config, runner)
    assert accuracy == 1.0 and losses[-1] < 0.1 * losses[0]


def test_reading_order_examples_put_the_first_named_of_two_unplaced_objects_left():
    """Reading order changes only the images of two-object and colour-attribution captions, only by mirroring, and
    puts the first-named object left of the second (read back by the detector); everything else is
    world.training_example's, bit for bit."""
    from toyworld.teacher import UNORDERED_PAIRS, reading_order_example

    detector = ShapeDetector()
    mirrored_any = False
    for i in range(36):
        metadata, image, mirrored = reading_order_example(i, seed=3, resolution=64)
        plain_metadata, plain = world.training_example(i, seed=3, resolution=64)
        assert metadata == plain_metadata
        assert np.array_equal(np.asarray(image), np.asarray(plain)) == (not mirrored)
        if metadata["tag"] not in UNORDERED_PAIRS:
            assert not mirrored
            continue
        mirrored_any |= mirrored
        found = {d.class_name: d.centroid[0] for d in detector.detect(image)}
        first, second = (entry["class"] for entry in metadata["include"])
        assert found[first] < found[second], (i, metadata["prompt"])
    assert mirrored_any


def test_teacher_build_takes_reading_order_with_a_new_cycle_like_a_straight_build(tmp_path):
    """--reading_order_from_cycle 2 given with a second cycle to a finished one-cycle build equals a straight build
    with those settings, and differs from the same growth without it; it cannot reach back into cycles already
    trained."""
    from toyworld.teacher import PRESETS, build_toy_teacher

    one = replace(PRESETS["smoke"], num_images=12, vae_steps=2, flow_steps=2, guidance_steps=2, batch=4,
                  vae_batch=2, checkpoint_every=2, cycle_steps=2)
    ordered = replace(one, flow_cycles=2, reading_order_from_cycle=2)
    build_toy_teacher(tmp_path / "straight", ordered, log=None)
    for name, config in (("grown", ordered), ("unordered", replace(ordered, reading_order_from_cycle=0))):
        build_toy_teacher(tmp_path / name, one, log=None)
        assert build_toy_teacher(tmp_path / name, config, log=None) is not None
    files = sorted((tmp_path / "straight" / "transformer").glob("*.safetensors"))
    assert files and all(f.read_bytes() == (tmp_path / "grown" / "transformer" / f.name).read_bytes() for f in files)
    assert any(f.read_bytes() != (tmp_path / "unordered" / "transformer" / f.name).read_bytes() for f in files)
    with pytest.raises(ValueError, match="reading_order_from_cycle 0 \\(asked 2\\); continue it with"):
        build_toy_teacher(tmp_path / "unordered", replace(ordered, flow_cycles=3), log=None)
    with pytest.raises(ValueError, match="--reading_order_from_cycle 3 names a cycle after the last"):
        build_toy_teacher(tmp_path / "unordered", replace(ordered, reading_order_from_cycle=3), log=None)


def test_reading_order_latents_are_the_mirrored_images_encoded_like_the_training_set(tmp_path):
    """Exactly the mirrored examples' latents change, and the normalisation reproduces the build's own latents."""
    from diffusers import AutoencoderKL

    from toyworld.teacher import (PRESETS, _model_range, build_toy_teacher, normalised_latents, reading_order_example,
                                  reading_order_latents)

    config = replace(PRESETS["smoke"], num_images=24, vae_steps=2, flow_steps=1, guidance_steps=0, batch=4,
                     vae_batch=2)
    build_toy_teacher(tmp_path / "t", config, log=None)
    vae = AutoencoderKL.from_pretrained(tmp_path / "t" / "build" / "vae")
    latents = torch.load(tmp_path / "t" / "build" / "latents.pt", weights_only=True)["latents"]
    examples = [reading_order_example(i, config.seed, config.resolution) for i in range(config.num_images)]
    mirrored = torch.tensor([flipped for _, _, flipped in examples])
    ordered = reading_order_latents(vae, latents, config)
    assert mirrored.any() and torch.equal((ordered != latents).flatten(1).any(1), mirrored)
    plain = torch.from_numpy(np.stack([_model_range(world.training_example(i, config.seed, config.resolution)[1])
                                       for i in range(config.num_images)]))
    again = normalised_latents(vae, plain)
    # (to CPU conv kernels' batch-size-dependent rounding; a wrong shift or scale is off by O(1))
    assert torch.allclose(again, latents, atol=2e-3), (again - latents).abs().max()
    flipped = torch.from_numpy(np.stack([_model_range(image) for _, image, _ in examples]))
    assert torch.allclose(normalised_latents(vae, flipped), ordered, atol=2e-3)
