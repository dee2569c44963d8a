"""Data layer: readers -> format detection and normalisation -> per-stage processors."""

from medicalgpt.data.formats import (
    detect_format,
    to_conversation,
    to_grpo,
    to_preference,
    to_rl_prompts,
    to_text,
    to_unpaired,
)
from medicalgpt.data.loading import load_splits
from medicalgpt.data.processors import (
    LengthLimits,
    build_preference_splits,
    build_pretraining_splits,
    build_sft_splits,
    build_unpaired_splits,
    pack_sft_splits,
    sorted_by_length,
)
from medicalgpt.data.readers import find_data_files, iter_records
from medicalgpt.errors import DataError

__all__ = ["DataError", "LengthLimits", "build_preference_splits", "build_pretraining_splits", "build_sft_splits",
           "build_unpaired_splits", "detect_format", "find_data_files", "iter_records", "load_splits",
           "pack_sft_splits", "sorted_by_length", "to_conversation", "to_grpo", "to_preference", "to_rl_prompts",
           "to_text", "to_unpaired"]
