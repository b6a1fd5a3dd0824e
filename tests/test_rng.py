"""What torch's random methods draw, and skipping draws: a generator moved past a target's draws
by ``rng.skip`` is where torch's own call leaves it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

from prunerecipe import rng


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("amount", [0, 0.3, 5])
def test_skipping_the_counted_draws_lands_where_torch_leaves_the_generator(dtype, amount):
    for method, kwargs in ((prune.random_unstructured, {}), (prune.random_structured, {"dim": 1})):
        m = nn.Linear(40, 30).to(dtype)
        torch.manual_seed(0)
        method(m, "weight", amount=amount, **kwargs)
        after = torch.get_rng_state()
        units = 30 * 40 if method is prune.random_unstructured else 40
        cls = prune.RandomUnstructured if method is prune.random_unstructured else prune.RandomStructured
        torch.manual_seed(0)
        rng.skip(rng.draws(cls, amount, units, dtype))
        assert torch.equal(torch.get_rng_state(), after), (method.__name__, dtype, amount)


def test_a_chained_random_step_draws_for_the_entries_left():
    m = nn.Linear(20, 10)
    prune.l1_unstructured(m, "weight", amount=50)  # 150 of 200 left
    torch.manual_seed(1)
    prune.random_unstructured(m, "weight", amount=0.5)
    after = torch.get_rng_state()
    torch.manual_seed(1)
    rng.skip(rng.draws(prune.RandomUnstructured, 0.5, 150, torch.float32))
    assert torch.equal(torch.get_rng_state(), after)
    assert rng.draws(prune.L1Unstructured, 0.5, 150, torch.float32) == 0 and not rng.is_random(prune.L1Unstructured)
