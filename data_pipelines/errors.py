"""Counted skips: bad input is skipped, counted by reason and warned about once per reason.

Every reader in the pipeline reports a rejected input through a `SkipCounter` instead of raising
or dropping it silently. The counts travel with the loader state (they are part of a checkpoint)
and are aggregated across DataLoader workers into `StreamingLoader.skipped` for the training log.

Reasons used by the pipeline:
    missing_shard, unreadable_shard (zero-byte or not a tar), truncated_shard (cut inside a member or a
    header, or without its end-of-archive block: the samples before the cut are kept, the one in progress
    is not), duplicate_key (a key whose members repeat: that sample is skipped, the shard read on),
    empty_sample, bad_image, image_too_large (over data.max_image_pixels), missing_image,
    missing_caption, bad_caption, bad_json (also a QA record whose question/answer is not a string).
"""
from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger("data_pipelines")


class BadSample(Exception):
    """A sample (or shard) that must be skipped; `reason` is the counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class SkipCounter:
    """Per-reason skip counts; the first skip of each reason is logged with the sample key."""

    def __init__(self, counts: dict[str, int] | None = None):
        self.counts: Counter[str] = Counter(counts or {})

    def skip(self, reason: str, key: str, detail: str = "") -> None:
        if self.counts[reason] == 0:
            log.warning("skipping %s (%s)%s; further '%s' skips are only counted",
                        key, reason, f": {detail}" if detail else "", reason)
        self.counts[reason] += 1

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


def merge_counts(counts: list[dict[str, int]]) -> dict[str, int]:
    """Sum per-reason counts from several workers."""
    total: Counter[str] = Counter()
    for c in counts:
        total.update(c)
    return dict(sorted(total.items()))
