"""The ground floor of cmoe-vlm: what `data_pipelines`, `vision` and `cmoe_vlm` all share.

    checks.py    ConfigError, check: config errors that name the field and what is allowed
    modality.py  Modality (TEXT = 0, IMAGE = 1), the one definition of the modality codes
    batch.py     Batch and DocumentLayout: the packed-batch contract between the data pipeline
                 and the model (docs/design.md, "The batch contract")
    runtime.py   environment defaults applied before torch loads (OMP_WAIT_POLICY, DS_ACCELERATOR)
    tiles.py     Tiles: an image as thumbnail + tiles (vision.max_tiles), made by vision, laid out by
                 data_pipelines

It imports none of the three packages, so none of them imports a package that imports it. Each of
them imports it first: importing it applies the runtime defaults and loads no torch (the batch
names load batch.py, and torch, when first used).
"""
from cmoe_base.runtime import apply_runtime_defaults

apply_runtime_defaults()

from cmoe_base.checks import ConfigError, check  # noqa: E402
from cmoe_base.modality import Modality  # noqa: E402
from cmoe_base.tiles import Tiles  # noqa: E402

__all__ = ["Batch", "ConfigError", "DocumentLayout", "IGNORE_INDEX", "Modality", "check", "stack_images", "Tiles"]


def __getattr__(name: str):
    if name in ("Batch", "DocumentLayout", "IGNORE_INDEX", "stack_images"):
        from cmoe_base import batch
        return getattr(batch, name)
    raise AttributeError(f"module 'cmoe_base' has no attribute {name!r}")
