"""An image split into tiles (`vision.max_tiles`): what the tiling transform returns and the sequence
builder lays out. No torch here: the tiles are whatever the transform made (tensors (3, S, S))."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Tiles:
    """A global thumbnail and rows × cols tower-size tiles in raster order (tiles[r * cols + c]).

    `data_pipelines.sequence.build_sequence` lays it out as the thumbnail's image block, then the
    tiles row by row, each tile its own image block, a separator text between tile rows:
        <img_start> thumb <img_end> <img_start> t00 <img_end> <img_start> t01 <img_end> \\n <img_start> t10 ...
    Each tile being its own image, its last token is a forced chunk boundary (a modality switch follows).
    With `forced` false (vision.tile_boundaries: learned) the tiles follow each other in one image run,
    no marker nor separator between them, so the chunk module decides whether a concept ends at a tile edge:
        <img_start> thumb <img_end> <img_start> t00 t01 t10 t11 <img_end>"""
    thumbnail: Any
    tiles: list[Any]
    rows: int
    cols: int
    forced: bool = True

    def __post_init__(self) -> None:
        if len(self.tiles) != self.rows * self.cols:
            raise ValueError(f"Tiles: {len(self.tiles)} tiles for a {self.rows}x{self.cols} grid")

    def images(self) -> list[Any]:
        """In the order the LM reads them: thumbnail, then the tiles in raster order."""
        return [self.thumbnail, *self.tiles]
