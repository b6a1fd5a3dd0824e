"""A Hugging Face model's ``config`` after compaction.

``from_pretrained`` builds the model from ``config.json`` and only then loads weights, so
the config must describe the compacted shapes. A config holds one MLP width for all layers
(``intermediate_size`` for Llama and BERT, ``n_inner`` for GPT-2, ...): it is updated when
every compacted group went from the same width to the same width, and the result is
checked by building the model from the new config on the ``meta`` device (no memory) and
comparing every tensor's shape. Anything else is reported, and the config left as it was.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..text import listing
from .inputs import is_hugging_face
from .record import RECORD_KEY

#: config keys that hold an MLP's hidden width, by the model families that use them
WIDTH_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "ffn_hidden_size", "inner_dim", "hidden_dim", "encoder_ffn_dim", "decoder_ffn_dim")


def _width_keys(config: Any, old: int) -> list[str]:
    keys = [k for k in WIDTH_KEYS if getattr(config, k, None) == old]
    # GPT-2 style: n_inner None means 4 * n_embd
    if getattr(config, "n_inner", 0) is None and 4 * int(getattr(config, "n_embd", 0) or 0) == old:
        keys.append("n_inner")
    return keys


def mismatches(model: nn.Module) -> list[str]:
    """Tensors whose shape in ``model`` differs from a model built from ``model.config``
    (empty when the config describes the model, as ``from_pretrained`` needs)."""
    with torch.device("meta"):
        fresh = type(model)(copy.deepcopy(model.config))
    expected = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    out = []
    for key, value in model.state_dict().items():
        if key == RECORD_KEY or key not in expected:
            continue
        if tuple(value.shape) != expected[key]:
            out.append(f"{key} {'x'.join(map(str, value.shape))} (the config builds {'x'.join(map(str, expected[key]))})")
    return out


def update_config(model: nn.Module, widths: Sequence[tuple[int, int]]) -> tuple[dict[str, int], str | None]:
    """Set the config's MLP width after a compaction of groups ``(old width, new width)``.

    Returns:
        The keys changed and their new values, and a note when the config could not be made
        to describe the model (then it is left as it was).
    """
    if not is_hugging_face(model) or not widths:
        return {}, None
    config = model.config
    pairs = sorted(set(widths))
    if len(pairs) > 1:
        shown = [f"{old} -> {new}" for old, new in pairs]
        return {}, (
            "model.config was not updated: "
            + listing("the compacted groups changed different widths", shown)
            + "; a Hugging Face config holds one width for every layer, so save this model as a state_dict (its compaction record rebuilds it)"
        )
    old, new = pairs[0]
    keys = _width_keys(config, old)
    if not keys:
        return (
            {},
            f"model.config was not updated: no key of it holds the width {old} that compaction changed to {new} (looked for {', '.join(WIDTH_KEYS)})",
        )
    saved = {k: getattr(config, k) for k in keys}
    # every key that holds the old width, else one of them alone (BART's encoder_ffn_dim when
    # only the encoder's MLPs were compacted): the first choice that describes the model
    wrong: list[str] = []
    for chosen in [keys] + ([[k] for k in keys] if len(keys) > 1 else []):
        for k in chosen:
            setattr(config, k, new)
        try:
            wrong = mismatches(model)
        except Exception as exc:  # a model class that cannot be built from its config alone
            wrong = [f"building {type(model).__name__} from its config failed ({type(exc).__name__}: {exc})"]
        if not wrong:
            return {k: new for k in chosen}, None
        for k, v in saved.items():
            setattr(config, k, v)
    return {}, (
        "model.config was not updated: "
        + listing(
            f"with {', '.join(keys)} = {new} the config would not describe this model (a Hugging Face config holds one width for every layer)",
            wrong,
        )
    )
