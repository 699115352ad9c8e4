"""The modality of a token position. Batches store it as int64 codes (B, T) of this enum."""
from __future__ import annotations

import enum


class Modality(enum.IntEnum):
    TEXT = 0
    IMAGE = 1

    @property
    def label(self) -> str:
        """'text' or 'image': the name used in metrics and reports."""
        return self.name.lower()
