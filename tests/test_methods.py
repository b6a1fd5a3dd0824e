from __future__ import annotations

import pickle
from typing import Literal, Optional

import pytest
import torch
import torch.nn.utils.prune as prune

from prunerecipe import (
    RecipeError,
    apply_recipe,
    get_method,
    method_names,
    parse_recipe,
    pruning_method,
    register_method,
    unregister_method,
)
from prunerecipe.errors import MethodError

from .conftest import make_lenet, pruning_history


class FooBarPruningMethod(prune.BasePruningMethod):
    """The seed's custom method: prune every other entry in a tensor."""

    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t, default_mask):
        mask = default_mask.clone()
        mask.view(-1)[::2] = 0
        return mask


@pruning_method("unstructured")
def threshold(t, default_mask, *, below: float, amount=None):
    """Mask entries whose magnitude is below a threshold (amount is accepted and ignored)."""
    return default_mask * (t.abs() >= below).to(default_mask.dtype)


@pruning_method("structured", args_schema={"type": "object", "properties": {"dim": {"type": "integer"}}})
def first_slices(t, default_mask, amount, dim=0):
    mask = default_mask.clone()
    k = prune._compute_nparams_toprune(amount, t.shape[dim])
    index = [slice(None)] * t.dim()
    index[dim] = slice(0, k)
    mask[tuple(index)] = 0
    return mask


def test_builtins_are_listed_with_their_torch_classes():
    assert {"identity", "random_unstructured", "l1_unstructured", "random_structured", "ln_structured"} <= set(method_names())
    spec = get_method("ln_structured")
    assert spec.cls is prune.LnStructured and spec.origin == "built-in" and spec.pruning_type == "structured"
    assert spec.takes_amount and list(spec.arguments) == ["n", "dim"]
    assert not get_method("identity").takes_amount


def test_unknown_method_suggests_the_closest_name():
    with pytest.raises(MethodError, match=r"unknown method 'random_unstrctured' \(did you mean 'random_unstructured'\?\)"):
        get_method("random_unstrctured")


def test_seed_foobar_registered_in_process_masks_every_other_bias_entry():
    register_method("seed_foobar", FooBarPruningMethod)
    model = make_lenet()
    apply_recipe(model, parse_recipe("version: 1\nsteps:\n  - {select: {names: [fc3]}, params: [bias], method: seed_foobar}\n"))
    assert model.fc3.bias_mask.tolist() == [0.0, 1.0] * 5
    theirs = make_lenet()
    FooBarPruningMethod.apply(theirs.fc3, "bias")
    assert torch.equal(model.fc3.bias, theirs.fc3.bias)


def test_amount_for_foobar_is_an_error():
    register_method("seed_foobar", FooBarPruningMethod)
    with pytest.raises(RecipeError, match="method 'seed_foobar' takes no amount; remove 'amount'"):
        parse_recipe("version: 1\nsteps:\n  - {select: {}, params: [bias], method: seed_foobar, amount: 0.5}\n")


def test_register_method_rejects_bad_classes_and_taken_names():
    with pytest.raises(MethodError, match="not a torch.nn.utils.prune.BasePruningMethod subclass"):
        register_method("nope", dict)  # type: ignore[arg-type]
    with pytest.raises(MethodError, match="already registered \\(built-in\\)"):
        register_method("l1_unstructured", FooBarPruningMethod)
    with pytest.raises(MethodError, match="must be an identifier"):
        register_method("foo-bar", FooBarPruningMethod)

    class NoType(prune.BasePruningMethod):
        PRUNING_TYPE = "sideways"

        def compute_mask(self, t, default_mask):
            return default_mask

    with pytest.raises(MethodError, match="PRUNING_TYPE 'sideways'"):
        register_method("notype", NoType)
    register_method("seed_foobar", FooBarPruningMethod)
    register_method("seed_foobar", FooBarPruningMethod, replace=True)
    unregister_method("seed_foobar")
    assert "seed_foobar" not in method_names()


def test_function_form_binds_args_from_its_signature():
    register_method("threshold", threshold)
    spec = get_method("threshold")
    assert spec.takes_amount and list(spec.arguments) == ["below"]
    model = make_lenet()
    recipe = parse_recipe("version: 1\nsteps:\n  - {select: {names: [fc2]}, method: threshold, amount: 0, args: {below: 0.05}}\n")
    apply_recipe(model, recipe)
    orig = model.fc2.weight_orig
    assert torch.equal(model.fc2.weight_mask, (orig.abs() >= 0.05).float())
    assert pruning_history(model.fc2, "weight") == [threshold]
    with pytest.raises(RecipeError, match=r"method 'threshold' needs argument 'below'; it accepts: amount\|sparsity, below"):
        parse_recipe("version: 1\nsteps:\n  - {select: {}, method: threshold, amount: 0}\n")


def test_function_form_structured_with_args_schema_and_chaining():
    register_method("first_slices", first_slices)
    with pytest.raises(RecipeError, match=r"steps\[0\].args.dim: 'x' is not of type 'integer'"):
        parse_recipe("version: 1\nsteps:\n  - {select: {}, method: first_slices, amount: 1, args: {dim: x}}\n")
    model = make_lenet()
    recipe = parse_recipe("""
version: 1
steps:
  - {select: {names: [fc1]}, method: l1_unstructured, amount: 0.1}
  - {select: {names: [fc1]}, method: first_slices, amount: 2, args: {dim: 0}}
""")
    apply_recipe(model, recipe)
    alive_rows = model.fc1.weight_mask.sum(dim=1) != 0
    assert not alive_rows[:2].any() and alive_rows[2:].all()
    assert pruning_history(model.fc1, "weight") == [prune.L1Unstructured, first_slices]


def test_function_form_methods_pickle_with_the_model():
    register_method("threshold", threshold)
    model = make_lenet()
    apply_recipe(model, parse_recipe("version: 1\nsteps:\n  - {select: {names: [fc2]}, method: threshold, amount: 0, args: {below: 0.05}}\n"))
    clone = pickle.loads(pickle.dumps(model))
    assert torch.equal(clone.fc2.weight_mask, model.fc2.weight_mask)


def test_constructor_validation_errors_are_reported_with_location():
    class Picky(prune.BasePruningMethod):
        PRUNING_TYPE = "unstructured"

        def __init__(self, amount, mode="fast"):
            if mode not in ("fast", "slow"):
                raise ValueError(f"mode must be fast or slow, not {mode!r}")
            self.amount, self.mode = amount, mode

        def compute_mask(self, t, default_mask):
            return default_mask

    register_method("picky", Picky)
    with pytest.raises(RecipeError) as err:
        parse_recipe("version: 1\nsteps:\n  - select: {}\n    method: picky\n    amount: 0.1\n    args: {mode: medium}\n", "p.yaml")
    assert str(err.value) == "p.yaml:6:11: steps[0].args: method 'picky' rejected its arguments: ValueError: mode must be fast or slow, not 'medium'"


def test_kwargs_methods_accept_any_argument():
    class Flexible(prune.BasePruningMethod):
        PRUNING_TYPE = "unstructured"

        def __init__(self, **options):
            self.options = options

        def compute_mask(self, t, default_mask):
            return default_mask

    register_method("flexible", Flexible)
    r = parse_recipe("version: 1\nsteps:\n  - {select: {}, method: flexible, args: {anything: 1}}\n")
    assert dict(r.steps[0].args) == {"anything": 1}


def test_without_a_schema_simple_annotations_check_argument_types():
    class Typed(prune.BasePruningMethod):
        PRUNING_TYPE = "unstructured"

        def __init__(self, amount, k: int = 1, scale: float = 1.0, mode: Literal["a", "b"] = "a", tag: Optional[str] = None, extra=None):  # noqa: UP045 - users write Optional
            self.amount, self.k = amount, k

        def compute_mask(self, t, default_mask):
            return default_mask

    register_method("typed", Typed)
    ok = "version: 1\nsteps:\n  - {select: {}, method: typed, amount: 0.1, args: {k: 2, scale: 3, mode: b, tag: null, extra: [1]}}\n"
    assert dict(parse_recipe(ok).steps[0].args)["scale"] == 3
    with pytest.raises(RecipeError) as err:
        parse_recipe("version: 1\nsteps:\n  - {select: {}, method: typed, amount: 0.1, args: {k: x, scale: true, mode: c, tag: 3}}\n", "t.yaml")
    lines = str(err.value).splitlines()
    assert lines[0].startswith("t.yaml:3:56: steps[0].args.k: 'x' is not an integer (method 'typed' accepts: amount|sparsity, k=1")
    assert "steps[0].args.scale: True is not a number" in lines[1]
    assert "steps[0].args.mode: 'c' is not of type Literal['a', 'b']" in lines[2]
    assert "steps[0].args.tag: 3 is not of type Optional[str]" in lines[3]


def test_an_invalid_args_schema_is_refused_when_the_method_is_registered():
    # it used to fail inside jsonschema at the first recipe naming the method, unlocated
    schema = {"type": "object", "properties": {"n": {"type": "nonsense"}}}
    with pytest.raises(MethodError, match=r"method 'bad_schema' has an invalid args_schema at properties/n/type: 'nonsense' is not valid"):
        register_method("bad_schema", prune.L1Unstructured, args_schema=schema)
    with pytest.raises(MethodError, match=r"has an args_schema that is a list, not a JSON Schema"):
        register_method("bad_schema", prune.L1Unstructured, args_schema=[1])  # type: ignore[arg-type]
    assert "bad_schema" not in method_names()
