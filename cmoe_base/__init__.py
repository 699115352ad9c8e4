"""The ground floor of cmoe-vlm: what `data_pipelines`, `vision` and `cmoe_vlm` all share.

    checks.py    ConfigError, check: config errors that name the field and what is allowed
    modality.py  Modality (TEXT = 0, IMAGE = 1), the one definition of the modality codes
    batch.py     Batch and DocumentLayout: the packed-batch contract between the data pipeline
                 and the model (docs/design.md, "The batch contract")

It imports none of the three packages, so none of them imports a package that imports it.
"""
from cmoe_base.batch import IGNORE_INDEX, Batch, DocumentLayout
from cmoe_base.checks import ConfigError, check
from cmoe_base.modality import Modality

__all__ = ["Batch", "ConfigError", "DocumentLayout", "IGNORE_INDEX", "Modality", "check"]
