"""GenEval prompts, the GenEval folder layout, and the batched / sharded / resumable sampling driver."""

import json

import pytest
import torch
from PIL import Image

from evaluation.geneval import (Shard, check_run_config, generate_geneval, image_seed, is_complete, load_prompts,
                                run_dir, write_prompt)


def test_shipped_geneval_prompts_and_metadata_agree():
    items = load_prompts()
    assert len(items) == 553
    lines = (load_prompts.__globals__["EVAL_DIR"] / "generation_prompts.txt").read_text().splitlines()
    assert [i["prompt"] for i in items] == [line.strip() for line in lines]
    assert {"tag", "include", "prompt"} <= set(items[0])
    tags = {i["tag"] for i in items}
    assert tags == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert len(load_prompts(limit=3)) == 3


def test_prompts_file_and_errors(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n a dog \n")
    assert load_prompts(prompts_file=tmp_path / "p.txt") == [{"prompt": "a cat"}, {"prompt": "a dog"}]
    (tmp_path / "m.jsonl").write_text(json.dumps({"tag": "x"}) + "\n")
    with pytest.raises(ValueError, match="no 'prompt' key"):
        load_prompts(metadata_file=tmp_path / "m.jsonl")
    with pytest.raises(ValueError, match="either"):
        load_prompts(tmp_path / "p.txt", tmp_path / "m.jsonl")


def test_layout_is_geneval_and_writes_are_atomic(tmp_path):
    run = run_dir(tmp_path, 512, 4, 3.5, global_step=1000)
    assert run == tmp_path / "GenEval_RESOLUTION512_NFE4_cfg3.5" / "images" / "global_steps1000"
    run.mkdir(parents=True)
    images = [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(4)]
    folder = write_prompt(run, 7, {"prompt": "a cat", "tag": "single_object"}, images)
    assert folder.name == "00007"
    assert json.loads((folder / "metadata.jsonl").read_text()) == {"prompt": "a cat", "tag": "single_object"}
    assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png", "0002.png", "0003.png"]
    assert is_complete(run, 7, 4) and not is_complete(run, 7, 5) and not is_complete(run, 8, 4)
    assert [p.name for p in run.iterdir()] == ["00007"]  # no temporary folder left behind


def test_run_config_mismatch_is_refused(tmp_path):
    check_run_config(tmp_path, {"steps": 4})
    check_run_config(tmp_path, {"steps": 4})
    with pytest.raises(ValueError, match="other settings"):
        check_run_config(tmp_path, {"steps": 2})


def test_image_seeds_are_distinct_and_stable():
    seeds = {image_seed(42, i, j) for i in range(100) for j in range(4)}
    assert len(seeds) == 400
    assert image_seed(42, 3, 1) == image_seed(42, 3, 1) != image_seed(43, 3, 1)


def fake_generate(calls):
    """Images whose pixel value is the first random number of their generator: identifies the seed used."""
    def generate(texts, generators):
        calls.append(list(texts))
        out = []
        for g in generators:
            value = int(torch.randint(0, 256, (1,), generator=g))
            out.append(Image.new("L", (4, 4), value))
        return out
    return generate


def read_run(run, n):
    return {i: [Image.open(run / f"{i:05d}" / "samples" / f"{j:04d}.png").getpixel((0, 0)) for j in range(4)]
            for i in range(n)}


def test_driver_is_batch_and_shard_invariant_and_resumes(tmp_path):
    prompts = [{"prompt": f"p{i}"} for i in range(7)]
    calls = []
    generate_geneval(fake_generate(calls), prompts, tmp_path / "a", batch_size=1, seed=5)
    assert len(calls) == 7
    calls.clear()
    generate_geneval(fake_generate(calls), prompts, tmp_path / "b", batch_size=3, seed=5)
    assert [len(c) for c in calls] == [3, 3, 1]
    for rank in range(2):
        generate_geneval(fake_generate([]), prompts, tmp_path / "c", batch_size=2, seed=5, shard=Shard(rank, 2))
    reference = read_run(tmp_path / "a", 7)
    assert read_run(tmp_path / "b", 7) == reference == read_run(tmp_path / "c", 7)
    assert len({v for images in reference.values() for v in images}) > 4  # the images do differ

    calls.clear()
    written, skipped = generate_geneval(fake_generate(calls), prompts, tmp_path / "b", batch_size=3, seed=5)
    assert (written, skipped, calls) == (0, 7, [])
    with pytest.raises(ValueError, match="other settings"):
        generate_geneval(fake_generate(calls), prompts, tmp_path / "b", batch_size=3, seed=6)


def test_shards_partition_the_prompts():
    parts = [Shard(r, 3).indices(10) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(10))
