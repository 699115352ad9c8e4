"""transformers processors for an export: `AutoProcessor.from_pretrained(folder)` lays out prompts
with images exactly as training does (docs/design.md §7).

    processor = AutoProcessor.from_pretrained("runs/tiny/final")
    inputs = processor(text=["<image> A picture of"], images=[img])
    out = model.generate(**inputs, max_new_tokens=16)
    processor.batch_decode(out[:, inputs["input_ids"].shape[1]:])

`ConceptMoEImageProcessor` is the encoder's eval transform (timm's, from the data config the export
records: input size, interpolation, crop, mean/std), so a PIL image gives the tensor training gave.
`ConceptMoEProcessor` splits each text at its `<image>` markers and builds the sequence with
`data_pipelines.sequence.build_sequence` (bos, text, `<img_start>` + tokens_per_image image tokens +
`<img_end>` per image), pads on the left (for generation) and returns input_ids, attention_mask,
mm_token_type_ids (1 at image positions) and pixel_values. Its tokenizer is the export's, with the
image tokens added as `data_pipelines.tokenizer.HFTokenizer` adds them in training.

Images at their own size (an export of a model with `vision.max_pixels`): the image processor records
the budget and the token unit, resizes each image as training did (`vision.transforms.FitTransform`),
returns pixel_values padded to the largest image with `image_sizes` (N, 2), and the processor gives
each image its own token count (rows × cols of its grid).
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import BatchFeature, ProcessorMixin
from transformers.image_processing_utils import BaseImageProcessor

from cmoe_base import Modality, Tiles, stack_images
from data_pipelines.images import to_rgb
from data_pipelines.sequence import build_sequence
from data_pipelines.tokenizer import IMAGE_TOKENS, HFTokenizer

from ..checkpoints.remote_code import TIMM_FIELDS, image_processor_fields



class ConceptMoEImageProcessor(BaseImageProcessor):
    """PIL images -> pixel_values (N, 3, H, W) through the encoder's eval transform: timm's for the
    recorded data config, or a transformers tower's recorded processor settings."""

    model_input_names = ["pixel_values"]

    def __init__(self, input_size: list[int] | None = None, interpolation: str = "bicubic",
                 mean: list[float] | None = None, std: list[float] | None = None, crop_pct: float = 1.0,
                 crop_mode: str = "center", tower: dict[str, Any] | None = None,
                 token_unit: list[int] | None = None, min_pixels: int | None = None, max_pixels: int | None = None,
                 max_tiles: int = 0, tile_boundaries: str = "forced", **kwargs: Any):
        super().__init__(**kwargs)
        self.tower = tower  # a transformers tower's processor settings (vision.hf_tower.processor_settings)
        self.input_size = list(input_size or (3, 64, 64))
        self.interpolation, self.crop_pct, self.crop_mode = interpolation, crop_pct, crop_mode
        self.mean = list(mean or (0.5, 0.5, 0.5))
        self.std = list(std or (0.5, 0.5, 0.5))
        self.token_unit, self.min_pixels, self.max_pixels = token_unit, min_pixels, max_pixels  # own sizes
        self.max_tiles = max_tiles  # tiles + thumbnail (vision.max_tiles): transform returns cmoe_base.Tiles
        self.tile_boundaries = tile_boundaries  # vision.tile_boundaries: the tiles' layout
        self._transform = None

    @classmethod
    def for_encoder(cls, encoder) -> ConceptMoEImageProcessor:
        """The processor of a `vision.VisionEncoder`: its eval transform's data config."""
        return cls(**image_processor_fields(encoder))

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("_transform", None)
        return out

    def transform(self, image) -> torch.Tensor:
        if self._transform is None and self.max_pixels is not None:
            from vision.transforms import FitTransform
            self._transform = FitTransform(self.token_unit, self.min_pixels, self.max_pixels, self.interpolation,
                                           self.mean, self.std)
        if self._transform is None and self.max_tiles:
            from timm.data import create_transform

            from vision.transforms import TileTransform
            cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in ((k, getattr(self, k)) for k in TIMM_FIELDS)}
            self._transform = TileTransform(create_transform(**cfg, is_training=False), tuple(self.input_size[1:]),
                                            self.max_tiles, self.interpolation, self.mean, self.std,
                                            self.tile_boundaries == "forced")
        if self._transform is None and self.tower is not None:
            from vision.transforms import settings_transform
            self._transform = settings_transform(self.tower)
        if self._transform is None:
            from timm.data import create_transform
            cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in ((k, getattr(self, k)) for k in TIMM_FIELDS)}
            self._transform = create_transform(**cfg, is_training=False)
        return self._transform(to_rgb(image))  # 16-bit greyscale scaled, as in training

    def __call__(self, images, return_tensors: str | None = "pt", **kwargs: Any) -> BatchFeature:
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        pixels = [self.transform(im) for im in images]
        pixels = [t for p in pixels for t in (p.images() if isinstance(p, Tiles) else [p])]
        if self.max_pixels is None:
            return BatchFeature({"pixel_values": torch.stack(pixels)}, tensor_type=return_tensors)
        stacked, _ = stack_images(pixels)
        sizes = torch.tensor([list(p.shape[-2:]) for p in pixels], dtype=torch.long)  # (N, 2) each image's (H, W)
        return BatchFeature({"pixel_values": stacked, "image_sizes": sizes}, tensor_type=return_tensors)

    def image_tokens(self, image) -> int:
        """LM tokens of one image at its own size (max_pixels set): rows × cols of its token grid."""
        if self._transform is None:
            self.transform(image)  # builds the FitTransform
        (uh, uw), (height, width) = self.token_unit, self._transform.size(to_rgb(image))
        return (height // uh) * (width // uw)

    preprocess = __call__


class ConceptMoEProcessor(ProcessorMixin):
    """Text with `<image>` markers + images -> the model's inputs (see the module docstring)."""

    def __init__(self, image_processor=None, tokenizer=None, tokens_per_image: int = 16,
                 image_marker: str = IMAGE_TOKENS["image"], chat_template: str | None = None, **kwargs: Any):
        self.tokens_per_image = tokens_per_image
        self.image_marker = image_marker
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def __call__(self, images=None, text: str | list[str] | None = None, return_tensors: str | None = "pt",
                 padding_side: str = "left", **kwargs: Any) -> BatchFeature:
        """`text`: one prompt or a list; each `<image>` marker takes the next image of `images` (a
        flat list in prompt order, or one list per prompt). Rows are padded on `padding_side`."""
        if text is None:
            raise ValueError("ConceptMoEProcessor: give text (with an <image> marker per image)")
        if kwargs:
            raise TypeError(f"ConceptMoEProcessor got unsupported arguments {sorted(kwargs)}")
        texts = [text] if isinstance(text, str) else list(text)
        flat = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
        flat = [im for item in flat for im in (item if isinstance(item, (list, tuple)) else [item])]
        markers = sum(t.count(self.image_marker) for t in texts)
        if markers != len(flat):
            raise ValueError(f"{markers} {self.image_marker} markers in the text but {len(flat)} images")
        if self.image_processor.max_tiles:  # the tiling decides the layout: transform first
            flat = [self.image_processor.transform(im) for im in flat]
        tok, queue, seqs = self.token_ids(), iter(flat), []
        for t in texts:
            parts = t.split(self.image_marker)
            pieces = [p for i, part in enumerate(parts) for p in ([next(queue)] if i else []) + ([part] if part else [])]
            per_image = self.image_processor.image_tokens if self.image_processor.max_pixels else self.tokens_per_image
            seqs.append(build_sequence(pieces, tok, per_image, add_bos=True, add_eos=False))
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), tok.pad_id, dtype=torch.long)
        mask, modality = torch.zeros_like(ids), torch.full_like(ids, int(Modality.TEXT))
        for r, s in enumerate(seqs):
            cols = slice(T - len(s), T) if padding_side == "left" else slice(0, len(s))
            ids[r, cols], mask[r, cols] = torch.tensor(s.input_ids), 1
            modality[r, cols] = torch.tensor(s.modality)
        data = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": modality}
        if flat and self.image_processor.max_tiles:
            data["pixel_values"] = torch.stack([im for s in seqs for im in s.images])
        elif flat:
            data.update(self.image_processor(flat, return_tensors="pt"))
        return BatchFeature(data, tensor_type=return_tensors)

    def token_ids(self) -> HFTokenizer:
        """The tokenizer as training used it: with pad/bos/eos and the image tokens added when its files
        lack them (`HFTokenizer` adds them, in the same order, at the same ids)."""
        return HFTokenizer(self.tokenizer)  # adds nothing the second time

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        kwargs.setdefault("skip_special_tokens", True)
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        kwargs.setdefault("skip_special_tokens", True)
        return self.tokenizer.decode(*args, **kwargs)

