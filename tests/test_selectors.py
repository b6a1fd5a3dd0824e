from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

from prunerecipe import RecipeError, apply_recipe, parse_recipe, plan_recipe
from prunerecipe.errors import SelectorError
from prunerecipe.select import param_owners, resolve_targets, resolve_type, selects
from prunerecipe.spec import Selector


def names(model, selector, params=("weight",)):
    return [t.qualname for t in resolve_targets(list(model.named_modules()), selector, params)]


def test_bare_type_matches_any_class_in_the_mro(blocks):
    # MyLinear subclasses Linear: a bare "Linear" selects it too
    assert names(blocks, Selector(types=("Linear",))) == ["head.1.weight", "head.2.weight"]
    assert names(blocks, Selector(types=("MyLinear",))) == ["head.1.weight"]


def test_dotted_type_matches_by_identity_in_the_mro(blocks):
    assert names(blocks, Selector(types=("torch.nn.Linear",))) == ["head.1.weight", "head.2.weight"]
    assert names(blocks, Selector(types=("torch.nn.modules.conv.Conv2d",))) == ["features.0.weight", "features.2.weight"]
    assert resolve_type("torch.nn.Conv2d") is nn.Conv2d


def test_dotted_type_errors():
    with pytest.raises(SelectorError, match="has no attribute 'Nope'"):
        resolve_type("torch.nn.Nope")
    with pytest.raises(SelectorError, match="not a class"):
        resolve_type("torch.nn.functional.relu")
    with pytest.raises(SelectorError, match="No module named 'nowhere_pkg'"):
        resolve_type("nowhere_pkg.Layer")


def test_globs_span_dots_and_are_case_sensitive(blocks):
    assert names(blocks, Selector(names=("features.*",))) == ["features.0.weight", "features.2.weight", "features.3.weight"]
    assert names(blocks, Selector(names=("*0",))) == ["features.0.weight"]
    assert names(blocks, Selector(names=("head*",))) == ["head.1.weight", "head.2.weight"]
    with pytest.raises(SelectorError):
        names(blocks, Selector(names=("FEATURES.*",)))


def test_regex_must_match_the_whole_name(blocks):
    assert names(blocks, Selector(names=(r"re:features\.[02]",))) == ["features.0.weight", "features.2.weight"]
    # "features" alone would be a search hit, but must match whole names
    with pytest.raises(SelectorError):
        names(blocks, Selector(names=("re:feat",)))


def test_types_and_names_are_anded_exclude_is_any_of(blocks):
    sel = Selector(types=("Conv2d", "BatchNorm2d"), names=("features.*",), exclude_names=("features.0",))
    assert names(blocks, sel) == ["features.2.weight", "features.3.weight"]
    sel = Selector(names=("features.*", "head.*"), exclude_types=("BatchNorm2d",), exclude_names=("head.2",))
    assert names(blocks, sel) == ["features.0.weight", "features.2.weight", "head.1.weight"]


def test_empty_selector_selects_everything_with_the_param(blocks):
    assert names(blocks, Selector(), ("bias",)) == ["features.0.bias", "features.2.bias", "features.3.bias", "head.1.bias"]
    assert selects(Selector(), "", blocks)


def test_modules_without_the_param_are_skipped_bias_none_included(blocks):
    # head.2 is Linear(bias=False): it has no bias target
    assert names(blocks, Selector(names=("head.*",)), ("weight", "bias")) == ["head.1.weight", "head.1.bias", "head.2.weight"]


def test_already_pruned_parameters_are_still_targets(blocks):
    prune.l1_unstructured(blocks.head[1], "weight", amount=0.5)
    targets = resolve_targets(list(blocks.named_modules()), Selector(names=("head.1",)), ("weight",))
    assert [t.qualname for t in targets] == ["head.1.weight"]
    assert targets[0].is_pruned and targets[0].original is blocks.head[1].weight_orig


def test_zero_targets_is_an_error_naming_selector_and_what_matched(blocks):
    with pytest.raises(SelectorError) as err:
        names(blocks, Selector(types=("ReLU",)))
    assert str(err.value) == (
        "selector {types: [ReLU]} resolves to no parameter: it matched 1 module(s) (features.1) "
        "but none has parameter 'weight'; their parameters: (none)"
    )
    with pytest.raises(SelectorError, match=r"did you mean 'Conv2d'"):
        names(blocks, Selector(types=("Conv2D",)))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.embed.weight


def test_tied_parameters_are_an_error_naming_every_owner():
    model = Tied()
    assert param_owners(model)[id(model.embed.weight)] == ["embed.weight", "out.weight"]
    recipe = parse_recipe("version: 1\nsteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5}\n", "tied.yaml")
    with pytest.raises(RecipeError) as err:
        plan_recipe(model, recipe)
    assert str(err.value) == (
        "tied.yaml:3:14: steps[0].select: parameter out.weight is tied: one tensor shared by embed.weight, out.weight; "
        "pruning it through one owner would silently untie them. Leave it out with `exclude: {names: [out]}` in this step's select, "
        "or untie the weights first"
    )
    # excluding the tied owner makes it plannable
    ok = parse_recipe("version: 1\nsteps:\n  - {select: {types: [Linear], exclude: {names: [out]}}, method: l1_unstructured, amount: 0.5}\n")
    assert [t.qualname for t in plan_recipe(model, ok).targets] == ["body.weight"]


def test_a_module_registered_twice_is_one_owner():
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    assert param_owners(model)[id(lin.weight)] == ["0.weight"]
    recipe = parse_recipe("version: 1\nsteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5}\n")
    assert [t.qualname for t in plan_recipe(model, recipe).targets] == ["0.weight"]


def test_each_regex_is_matched_on_its_own(blocks):
    # found in review: joined into one alternation, flags and group names/numbers collided
    assert names(blocks, Selector(names=("re:(?i)HEAD\\.1",))) == ["head.1.weight"]
    assert names(blocks, Selector(names=("re:(?P<a>head\\.1)", "re:(?P<a>head\\.2)"))) == ["head.1.weight", "head.2.weight"]
    assert names(blocks, Selector(names=("re:(f)eatures\\.0", "re:(h)\\1*ead\\.2"))) == ["features.0.weight", "head.2.weight"]


def test_a_plan_only_applies_to_its_own_model_and_recipe(blocks):
    from prunerecipe import RecipeError, apply_recipe

    recipe = parse_recipe("version: 1\nsteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5}\n")
    other = parse_recipe("version: 1\nsteps:\n  - {select: {types: [Conv2d]}, method: l1_unstructured, amount: 0.5}\n")
    plan = plan_recipe(blocks, recipe)
    from .conftest import Blocks

    with pytest.raises(RecipeError, match="made for another model"):
        apply_recipe(Blocks(), recipe, plan=plan)
    with pytest.raises(RecipeError, match="made from another recipe"):
        apply_recipe(blocks, other, plan=plan)
    assert not prune.is_pruned(blocks)


def test_a_module_registered_twice_can_be_selected_by_either_name():
    lin = nn.Linear(3, 3)
    model = nn.Sequential()
    model.add_module("first", lin)
    model.add_module("alias", lin)
    recipe = parse_recipe("version: 1\nsteps:\n  - {select: {names: [alias]}, method: l1_unstructured, amount: 0.5}\n")
    assert [t.qualname for t in plan_recipe(model, recipe).targets] == ["alias.weight"]
    both = parse_recipe("version: 1\nsteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5}\n")
    assert [t.qualname for t in plan_recipe(model, both).targets] == ["first.weight"]


@pytest.mark.parametrize(
    ("select", "says"),
    [
        ("{types: [Conv2d, Linear]}, params: [weight, bais]", "steps[0].params: no selected module has a parameter 'bais' (did you mean 'bias'?)"),
        ("{names: [fc1, fc_2]}", "steps[0].select.names: no module name matches 'fc_2' (did you mean 'fc2'?)"),
        ("{types: [Conv2d, Linaer]}", "steps[0].select.types: no module is a 'Linaer' (did you mean 'Linear'?)"),
        (
            "{types: [Linear], exclude: {names: [fc_3]}}",
            "steps[0].select.exclude: exclude names: no module name matches 'fc_3' (did you mean 'fc3'?); it excludes nothing",
        ),
    ],
)
def test_a_typo_beside_a_working_entry_is_a_located_warning(select, says):
    from prunerecipe.errors import RecipeWarning
    from prunerecipe.zoo import LeNet

    recipe = parse_recipe(f"version: 1\nsteps:\n  - {{select: {select}, method: l1_unstructured, amount: 0.1}}\n", "r.yaml")
    with pytest.warns(RecipeWarning, match=re.escape(says)):
        plan_recipe(LeNet(), recipe)


def test_entries_a_model_family_lacks_are_not_warned_about():
    import warnings

    from prunerecipe.zoo import LeNet

    recipe = parse_recipe(
        "version: 1\nsteps:\n  - {select: {types: [Linear, Embedding], names: ['fc*', 'model.layers.*'], exclude: {names: [lm_head]}}, method: l1_unstructured, amount: 0.1}\n"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan_recipe(LeNet(), recipe)


@pytest.mark.parametrize(
    ("wrap", "how"),
    [
        (torch.nn.utils.parametrizations.weight_norm, "a torch.nn.utils.parametrize parametrization (WeightNorm)"),
        (torch.nn.utils.parametrizations.spectral_norm, "a torch.nn.utils.parametrize parametrization (SpectralNorm)"),
        (torch.nn.utils.weight_norm, "torch.nn.utils.weight_norm"),
        (torch.nn.utils.spectral_norm, "torch.nn.utils.spectral_norm"),
    ],
    ids=["parametrize-weight-norm", "parametrize-spectral-norm", "old-weight-norm", "old-spectral-norm"],
)
def test_a_weight_computed_by_another_reparametrization_is_a_located_error_not_skipped(wrap, how):
    # torch's prune raises KeyError on these (or, for the old spectral_norm, mistakes weight_orig
    # for its own); a type selector used to skip them silently
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the old functions are deprecated
        wrap(model[1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = parse_recipe("version: 1\nsteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5}\n", "r.yaml")
    with pytest.raises(RecipeError) as info:
        plan_recipe(model, recipe)
    assert str(info.value) == (
        f"r.yaml:3:14: steps[0].select: 1.weight ({type(model[1]).__name__}) is computed by {how}, which torch.nn.utils.prune "
        'cannot re-parametrize: remove it first (or fold it into a plain parameter), or leave the module out (exclude: {names: ["1"]})'
    )
    assert info.value.problems[0].code == "reparametrized"
    # what the message suggests works
    excluded = parse_recipe('version: 1\nsteps:\n  - {select: {types: [Linear], exclude: {names: ["1"]}}, method: l1_unstructured, amount: 0.5}\n')
    apply_recipe(model, excluded)
    assert prune.is_pruned(model[0]) and not hasattr(model[1], "weight_mask")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items() if k.startswith("1."))
