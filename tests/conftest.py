from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from prunerecipe import methods
from prunerecipe.zoo import LeNet

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def lenet() -> LeNet:
    torch.manual_seed(1234)
    return LeNet()


def make_lenet(seed: int = 1234) -> LeNet:
    torch.manual_seed(seed)
    return LeNet()


@pytest.fixture
def write_recipe(tmp_path: Path) -> Callable[[str, str], Path]:
    """Write dedented YAML into tmp_path and return the file's path."""

    def write(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path

    return write


@pytest.fixture(autouse=True)
def _clean_registry():
    """In-process registrations made by a test do not leak into the next."""
    with methods.isolated():
        yield


class Blocks(nn.Module):
    """A nested model: a Sequential "features" of convs and a classifier, plus a custom Linear subclass."""

    class MyLinear(nn.Linear):
        pass

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
        self.head = nn.Sequential(nn.Flatten(), Blocks.MyLinear(8, 4), nn.Linear(4, 2, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).mean(dim=(2, 3), keepdim=True)
        return self.head(x)


@pytest.fixture
def blocks() -> Blocks:
    torch.manual_seed(7)
    return Blocks()


def pruning_history(module: nn.Module, name: str) -> list[type]:
    """Classes of the pruning methods on ``module.<name>``, in order (one, or a container's)."""
    import torch.nn.utils.prune as prune

    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == name:
            if isinstance(hook, prune.PruningContainer):
                return [type(m) for m in hook]
            return [type(hook)]
    return []


def assert_same_pruning(ours: nn.Module, theirs: nn.Module) -> None:
    """Masks, state_dict keys (in order), values and PruningContainer histories all equal."""
    sd_a, sd_b = ours.state_dict(), theirs.state_dict()
    assert list(sd_a) == list(sd_b)
    for key in sd_a:
        assert torch.equal(sd_a[key], sd_b[key]), key
    mods_b = dict(theirs.named_modules())
    for name, mod in ours.named_modules():
        other = mods_b[name]
        for pname in [k[: -len("_orig")] for k in mod._parameters if k.endswith("_orig")]:
            assert pruning_history(mod, pname) == pruning_history(other, pname), f"{name}.{pname}"
            assert torch.equal(getattr(mod, pname), getattr(other, pname))
        assert len(mod._forward_pre_hooks) == len(other._forward_pre_hooks), name
