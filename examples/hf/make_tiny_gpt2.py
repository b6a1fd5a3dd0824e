"""Save a small GPT-2 (random weights, built from a config: nothing is downloaded) as a
Hugging Face model folder, for trying prunerecipe on a real checkpoint layout.

    python examples/hf/make_tiny_gpt2.py examples/hf/tiny-gpt2
"""

from __future__ import annotations

import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def main(folder: str) -> None:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=1000, n_positions=128, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    print(f"saved {folder}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tiny-gpt2")
