"""Checkpoints in and out: reading every kind people have (:mod:`.read`), loading into a
model with masks, ties and key prefixes handled (:mod:`.restore`), and writing ``torch``,
``dense`` or Hugging Face outputs atomically (:mod:`.write`, :mod:`.files`, :mod:`.hf`)."""

from __future__ import annotations

from .files import atomic_file, atomic_folder, check_output
from .hf import build_model
from .read import is_hf_folder, read_state_dict, weights_file
from .restore import fit_prefix, load_pruned_state_dict
from .write import FORMATS, parse_size, save_state_dict, state_dict_sparsity, write_output

__all__ = [
    "FORMATS",
    "atomic_file",
    "atomic_folder",
    "build_model",
    "check_output",
    "fit_prefix",
    "is_hf_folder",
    "load_pruned_state_dict",
    "parse_size",
    "read_state_dict",
    "save_state_dict",
    "state_dict_sparsity",
    "weights_file",
    "write_output",
]
