"""Pictures: captioned grids (toy benchmark, training validation), the toy benchmark's and the learning curves'
plots. Each is drawn from small inputs and checked for what a reader needs from it."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "script"))


def test_captioned_grid_puts_each_caption_under_its_tile():
    from common.grids import MIN_TILE, captioned_grid

    tiles = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    grid = captioned_grid(tiles, ["a photo of a red circle", "", "x" * 500], columns=2)
    pixels = np.asarray(grid)
    tile = MIN_TILE  # 64-pixel tiles are enlarged to 128 so a caption line fits
    row_h = grid.height // 2
    assert grid.width == 2 * tile and row_h > tile
    assert (pixels[:tile, :tile] == (255, 0, 0)).all() and (pixels[:tile, tile:] == (0, 0, 255)).all()
    assert (pixels[row_h:row_h + tile, :tile] == (0, 255, 0)).all()
    caption = pixels[tile:row_h]  # the first row's caption band
    assert (caption[:, :tile] < 128).any()  # text under the red tile
    assert not (caption[:, tile:] < 128).any()  # the empty caption draws nothing
    assert (pixels[row_h + tile:, :tile] < 128).any()  # the overlong caption is drawn (cut to three lines)
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        captioned_grid(tiles, ["a", "b"], columns=2)


def test_toy_benchmark_grid_shows_each_prompt(tmp_path):
    import toy_benchmark

    from evaluation.geneval import write_prompt

    run = tmp_path / "run"
    for i, prompt in enumerate(["a photo of a circle", "a photo of a square", "a photo of a ring"]):
        write_prompt(run, i, {"prompt": prompt, "tag": "single_object"},
                     [Image.new("RGB", (64, 64), (40 * i, 0, 0))] * 2)
    toy_benchmark.save_grid(run, tmp_path / "grid.png", images=5, columns=4)
    grid = Image.open(tmp_path / "grid.png")
    assert grid.width == 4 * 128 and grid.height > 2 * 128  # 5 tiles: two rows, each with a caption band
    pixels = np.asarray(grid.convert("RGB"))
    assert (pixels[128:grid.height // 2, :128] < 100).any()  # a caption under the first tile


def test_toy_benchmark_plot_is_written_from_the_results_table(tmp_path):
    import toy_benchmark

    result = json.loads((ROOT / "docs" / "toy_benchmark_full_results.json").read_text())
    path = tmp_path / "results.png"
    toy_benchmark.plot_results(result["rows"], result["chance"], path, "full")
    image = Image.open(path)
    assert image.width >= 1000 and image.height >= 400
    assert np.asarray(image.convert("L")).std() > 10  # not blank


def test_learning_curves_plot(tmp_path):
    import toy_curves

    curves = {"scm": [{"train_steps": s, "nfe": n, "overall": 0.1 * n + s / 1e4, "ci95": 0.03}
                      for s in (500, 1000) for n in (1, 2, 4)]}
    toy_curves.plot(curves, {("euler", 1): 0.05, ("euler", 28): 0.66}, tmp_path / "curves.png")
    assert np.asarray(Image.open(tmp_path / "curves.png").convert("L")).std() > 10
