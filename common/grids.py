"""Image grids with a caption under every tile (the prompt, the step count), so a right image can be told from a
wrong one at a glance: the toy benchmark's grids and the training loop's validation grids."""

from __future__ import annotations

import textwrap

MIN_TILE = 128  # smaller tiles are enlarged (nearest neighbour) so that a caption line fits under them
LINE_HEIGHT = 12  # PIL's default bitmap font is about 11 pixels high
CHAR_WIDTH = 6


def captioned_grid(tiles: list, captions: list[str], columns: int, max_lines: int = 3):
    """PIL image: `tiles` (PIL images of one size) `columns` to a row, each with its caption wrapped under it in
    up to `max_lines` lines (an overlong caption ends with "...")."""
    from PIL import Image, ImageDraw

    if not tiles:
        raise ValueError("captioned_grid: no images to put in a grid")
    if len(captions) != len(tiles):
        raise ValueError(f"captioned_grid: {len(tiles)} images but {len(captions)} captions")
    w, h = tiles[0].size
    scale = max(1, -(-MIN_TILE // w))
    w, h = w * scale, h * scale
    width_chars = max(8, (w - 4) // CHAR_WIDTH)
    wrapped = []
    for caption in captions:
        lines = textwrap.wrap(str(caption), width_chars) or [""]
        if len(lines) > max_lines:
            lines = lines[:max_lines]
            lines[-1] = lines[-1][: width_chars - 3] + "..."
        wrapped.append(lines)
    caption_h = LINE_HEIGHT * max(len(lines) for lines in wrapped) + 4
    rows = -(-len(tiles) // columns)
    grid = Image.new("RGB", (columns * w, rows * (h + caption_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (tile, lines) in enumerate(zip(tiles, wrapped)):
        x, y = (i % columns) * w, (i // columns) * (h + caption_h)
        tile = tile.convert("RGB")
        if scale > 1:
            tile = tile.resize((w, h), Image.NEAREST)
        grid.paste(tile, (x, y))
        for k, line in enumerate(lines):
            draw.text((x + 2, y + h + 2 + k * LINE_HEIGHT), line, fill="black")
    return grid
