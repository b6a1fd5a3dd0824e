"""Small built-in models for examples and tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class LeNet(nn.Module):
    """The seed walkthrough's LeNet for 1x28x28 inputs.

    conv1 1->6 3x3, conv2 6->16 3x3, fc1 400->120, fc2 120->84, fc3 84->10
    (the seed's debugging prints removed).

    >>> LeNet()(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3)
        self.conv2 = nn.Conv2d(6, 16, 3)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), (2, 2))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class DigitsNet(nn.Module):
    """A small CNN for scikit-learn's 8x8 digits (``examples/digits``): 1x8x8 in, 10 classes out.

    conv1 1->16 3x3, conv2 16->32 3x3 (both padded), 2x2 max-pool, fc1 512->64, fc2 64->10.

    >>> DigitsNet()(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def _seeded_hf(build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build().eval()


def tiny_gpt2() -> nn.Module:
    """A 4-layer GPT-2 (byte-level vocabulary) built from a config: random weights, no download.
    Needs transformers (``pip install "prunerecipe[hf]"``)."""
    import transformers

    config = transformers.GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=256, n_positions=128, bos_token_id=0, eos_token_id=0)
    return _seeded_hf(lambda: transformers.GPT2LMHeadModel(config))


def tiny_llama() -> nn.Module:
    """A 4-layer Llama (byte-level vocabulary) built from a config: random weights, no download."""
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=0,
    )
    return _seeded_hf(lambda: transformers.LlamaForCausalLM(config))
