from __future__ import annotations

import json
import time

import pytest

from prunerecipe import RecipeError, load_recipe, parse_recipe, recipe_from_dict, recipe_schema
from prunerecipe.spec import Schedule, Selector

from .conftest import ROOT

BASE = """
version: 1
vars:
  amt: 0.25
  count: 3
  prefix: fc
  dims: {dim: 0}
steps:
  - name: ${prefix}-layers
    select: {names: ["${prefix}*"]}
    method: l1_unstructured
    amount: ${amt}
  - select: {names: [conv1]}
    params: [bias]
    method: l1_unstructured
    amount: ${count}
  - select: {types: [Conv2d]}
    method: random_structured
    amount: 0.5
    args: ${dims}
"""


def test_vars_keep_their_type_when_whole_and_interpolate_inside_strings():
    r = parse_recipe(BASE)
    assert r.steps[0].amount == 0.25 and isinstance(r.steps[0].amount, float)
    assert r.steps[1].amount == 3 and isinstance(r.steps[1].amount, int)
    assert r.steps[0].name == "fc-layers"
    assert r.steps[0].select == Selector(names=("fc*",))
    assert dict(r.steps[2].args) == {"dim": 0}


def test_overrides_replace_vars_with_typed_values():
    r = parse_recipe(BASE, overrides={"amt": 0.5, "count": 2, "prefix": "conv"})
    assert r.steps[0].amount == 0.5 and r.steps[1].amount == 2 and r.steps[0].select.names == ("conv*",)


def test_an_override_may_supply_a_var_the_recipe_uses_but_does_not_declare():
    text = "version: 1\nsteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, amount: '${a}'}\n"
    assert parse_recipe(text, overrides={"a": 0.1}).steps[0].amount == 0.1


def test_an_override_that_matches_nothing_is_an_error():
    with pytest.raises(RecipeError) as err:
        parse_recipe(BASE, "r.yaml", overrides={"amnt": 0.5})
    assert (
        str(err.value) == "r.yaml:4:3: vars: override 'amnt' matches no var of this recipe (did you mean 'amt'?); its vars: amt, count, dims, prefix"
    )


def test_a_var_or_override_standing_for_a_placeholder_is_one_located_error_with_no_follow_on():
    text = "version: 1\nvars: {a: 0.2}\nsteps:\n  - {select: {types: [Linear]}, method: l1_unstructured, amount: '${a}'}\n"
    with pytest.raises(RecipeError) as err:
        parse_recipe(text, "r.yaml", overrides={"a": "${x}"})
    assert str(err.value) == (
        "r.yaml:4:66: steps[0].amount: ${a} stands for '${x}', itself a placeholder: a var (or a --set value) cannot refer to "
        "another var; give it a value"
    )
    with pytest.raises(RecipeError) as err:
        parse_recipe(text.replace("{a: 0.2}", "{a: '${b}', b: 0.3}"), "r.yaml")
    assert [p.path for p in err.value.problems] == [("vars", "a"), ("steps", 0, "amount")]  # no TypeError from the method


def test_dollar_dollar_escapes_a_literal_placeholder():
    r = parse_recipe("version: 1\nname: cost-$${x}\nsteps:\n  - {select: {}, method: identity}\n")
    assert r.name == "cost-${x}"


def test_whole_string_list_var_cannot_be_interpolated_partially():
    text = "version: 1\nvars: {l: [1]}\nname: a${l}\nsteps:\n  - {select: {}, method: identity}\n"
    with pytest.raises(RecipeError, match=r"\$\{l\} is a list; only a whole-string placeholder can take one"):
        parse_recipe(text)


def test_typed_recipe_fields_and_defaults():
    r = parse_recipe(
        """
version: 1
name: n
description: d
model: prunerecipe.zoo:LeNet
seed: 3
finalize: true
steps:
  - select: {types: [Linear], names: ["re:fc[12]"], exclude: {types: [Conv2d], names: [fc3]}}
    method: ln_structured
    sparsity: 0.5
    args: {n: .inf, dim: 1}
    seed: 4
  - select: {}
    method: l1_unstructured
    sparsity: 0.9
    schedule: {start: 2, end: 10, every: 2, curve: linear, initial_sparsity: 0.1}
""",
        "typed.yaml",
    )
    s0, s1 = r.steps
    assert (r.name, r.description, r.model, r.seed, r.finalize, r.lottery_ticket) == ("n", "d", "prunerecipe.zoo:LeNet", 3, True, False)
    assert s0.select == Selector(("Linear",), ("re:fc[12]",), ("Conv2d",), ("fc3",))
    assert s0.params == ("weight",) and s0.scope == "local" and s0.sparsity == 0.5 and s0.amount is None
    assert s0.args["n"] == float("inf") and r.step_seed(s0) == 4 and r.step_seed(s1) == 3
    assert s1.schedule == Schedule("epoch", 2, 10, 2, "linear", 0.1)
    assert s0.label == "steps[0]" and s1.how_much == "sparsity=0.9"
    assert r.source == "typed.yaml"


def test_schedule_end_defaults_to_start():
    r = parse_recipe("version: 1\nsteps:\n  - {select: {}, method: l1_unstructured, amount: 0.1, schedule: {start: 4}}\n")
    assert r.steps[0].schedule == Schedule(start=4, end=4)


def test_yaml_merge_keys_and_anchors_work():
    r = parse_recipe(
        """
version: 1
defaults: &d {method: l1_unstructured, amount: 0.3}
steps: []
""".replace(
            "defaults: &d {method: l1_unstructured, amount: 0.3}\nsteps: []",
            """steps:
  - &first {select: {types: [Linear]}, method: l1_unstructured, amount: 0.3}
  - {<<: *first, amount: 0.1}""",
        )
    )
    assert [s.amount for s in r.steps] == [0.3, 0.1]
    assert r.steps[1].select == Selector(types=("Linear",))


def test_recipe_from_dict_reports_paths_without_positions():
    r = recipe_from_dict({"version": 1, "steps": [{"select": {}, "method": "identity"}]})
    assert r.steps[0].method == "identity"
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"version": 1, "steps": [{"select": {}, "method": "l1_unstructured", "amount": 2.5}]}, "cfg")
    assert str(err.value) == "cfg: steps[0].amount: 2.5 is greater than the maximum of 1"


def test_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="missing.yaml: .*no such recipe file"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match="is a directory"):
        load_recipe(tmp_path)
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"version: 1\nname: caf\xe9\n")
    with pytest.raises(RecipeError, match=r"not UTF-8 text \(byte 20"):
        load_recipe(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    with pytest.raises(RecipeError, match="the file is empty"):
        load_recipe(empty)


def test_multiple_documents_are_refused():
    with pytest.raises(RecipeError, match="invalid YAML: expected a single document"):
        parse_recipe("version: 1\n---\nversion: 1\n")


def test_alias_bomb_is_refused_quickly():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    lines.append("version: 1")
    start = time.perf_counter()
    with pytest.raises(RecipeError, match="expands to more than 100000 nodes"):
        parse_recipe("\n".join(lines))
    assert time.perf_counter() - start < 5


def test_deep_nesting_and_huge_files_are_refused():
    with pytest.raises(RecipeError, match="nest"):
        parse_recipe("version: 1\nvars: {x: " + "[" * 200 + "]" * 200 + "}\n")
    with pytest.raises(RecipeError, match="limited to 1000000"):
        parse_recipe("version: 1\n" + "#" * 1_000_001)


def test_non_string_keys_and_odd_tags():
    with pytest.raises(RecipeError, match="mapping key '1' reads as int 1; keys must be strings"):
        parse_recipe("version: 1\nvars: {1: 1}\nsteps:\n  - {select: {}, method: identity}\n")
    # YAML 1.2 core schema: `on`/`yes` are plain strings, so they are fine as keys
    assert parse_recipe("version: 1\nvars: {on: 1, yes: 2}\nsteps:\n  - {select: {}, method: identity}\n").vars == {"on": 1, "yes": 2}
    with pytest.raises(RecipeError, match="YAML tag !!binary is not allowed"):
        parse_recipe("version: 1\nname: !!binary aGVsbG8=\nsteps:\n  - {select: {}, method: identity}\n")
    with pytest.raises(RecipeError, match="YAML tag !custom is not allowed"):
        parse_recipe("version: 1\nname: !custom x\nsteps:\n  - {select: {}, method: identity}\n")


def test_every_problem_of_a_file_is_reported_sorted_by_position():
    with pytest.raises(RecipeError) as err:
        load_recipe(ROOT / "tests/cases/load/types-and-ranges.yaml")
    lines = str(err.value).splitlines()
    assert len(lines) == len(err.value.problems) >= 10
    positions = [(p.line, p.col) for p in err.value.problems]
    assert positions == sorted(positions)


def test_schema_is_shipped_in_the_package_and_identical_to_schemas_dir():
    on_disk = json.loads((ROOT / "schemas" / "recipe.schema.json").read_text())
    assert recipe_schema() == on_disk
    assert on_disk["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_schema_accepts_every_example_recipe():
    import jsonschema
    import yaml

    validator = jsonschema.Draft202012Validator(recipe_schema())
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())  # raw, placeholders and all, as an editor sees it
        assert not list(validator.iter_errors(data)), path
    # and it rejects what the loader rejects, e.g. a float amount above 1
    bad = {"version": 1, "steps": [{"select": {}, "method": "l1_unstructured", "amount": 1.5}]}
    assert list(validator.iter_errors(bad))


def test_merge_key_bomb_is_refused_quickly():
    # each level merges the previous one twice: 2**28 keys if expanded naively
    text = "x: 1"
    inner = "&a0 {x: 1}"
    for i in range(1, 29):
        inner = f"&a{i} {{<<: [{inner}, *a{i - 1}], y{i}: 1}}"
    start = time.perf_counter()
    with pytest.raises(RecipeError, match="expands to more than 100000 nodes"):
        parse_recipe(f"version: 1\nvars: {{big: {inner}}}\nsteps: []\n")
    assert time.perf_counter() - start < 5
    del text


def test_merged_mapping_reached_through_an_alias_is_not_a_duplicate():
    r = parse_recipe("""
version: 1
steps:
  - select: &sel
      <<: {names: [fc1]}
      names: [fc2]
    method: identity
  - select: *sel
    method: identity
""")
    assert r.steps[0].select.names == ("fc2",) and r.steps[1].select.names == ("fc2",)


def test_merge_sources_earlier_win_and_explicit_keys_win():
    r = parse_recipe(
        """
version: 1
a: &a {method: l1_unstructured, amount: 0.1}
""".replace("a: &a {method: l1_unstructured, amount: 0.1}\n", "")
        + """steps:
  - <<: [{method: l1_unstructured, amount: 0.1}, {method: identity, amount: 0.9, select: {}}]
    amount: 0.2
"""
    )
    assert (r.steps[0].method, r.steps[0].amount) == ("l1_unstructured", 0.2)


def test_reading_is_capped_even_for_endless_files():
    with pytest.raises(RecipeError, match="larger than 1000000 bytes"):
        load_recipe("/dev/zero")


def test_integer_keys_stay_integers_and_floats_are_not_integers():
    with pytest.raises(RecipeError) as err:
        parse_recipe("version: 1.0\nseed: 3.0\nsteps:\n  - {select: {}, method: random_structured, amount: 1, args: {dim: 0.0}}\n", "f.yaml")
    assert str(err.value).splitlines() == [
        "f.yaml:1:10: version: 1.0 is not of type 'integer'",
        "f.yaml:2:7: seed: 3.0 is not of type 'integer'",
        "f.yaml:4:68: steps[0].args.dim: 0.0 is not of type 'integer' (method 'random_structured' accepts: amount|sparsity, dim=-1)",
    ]


def test_recipe_from_dict_refuses_what_yaml_could_not_hold():
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"version": 1, "steps": [{"select": {}, "method": "identity", 3: 4}], 1: 2, "zz": object()})
    text = str(err.value)
    assert "<dict>: (root): mapping key 1 is a int; keys must be strings" in text
    assert "<dict>: steps[0]: mapping key 3 is a int" in text and "zz: object is not plain data" in text


def test_control_characters_are_located_errors():
    # found by the fuzzer: PyYAML rejects these before parsing starts
    with pytest.raises(RecipeError) as err:
        parse_recipe("version: 1\nname: a\x07b\n", "c.yaml")
    assert str(err.value) == "c.yaml:2:8: (root): invalid YAML: character U+0007 is not allowed in YAML"


def test_limits_and_encoding_errors_have_locations():
    with pytest.raises(RecipeError) as err:
        parse_recipe("version: 1\nvars: {x: " + "[" * 80 + "]" * 80 + "}\n", "deep.yaml")
    assert str(err.value).startswith("deep.yaml:2:") and "nested more than 50 levels" in str(err.value)
    from prunerecipe.load.yaml import parse_yaml

    with pytest.raises(RecipeError) as err:
        parse_yaml(b"version: 1\nname: caf\xe9\n", "latin.yaml")
    assert str(err.value) == "latin.yaml:2:10: (root): not UTF-8 text (byte 20 cannot be decoded)"
    with pytest.raises(RecipeError, match="lone surrogate"):
        parse_recipe('version: 1\nname: "\\ud800"\nsteps:\n  - {select: {}, method: identity}\n')


def test_yaml_1_2_core_scalars():
    r = parse_recipe("version: 1\nseed: 010\nsteps:\n  - {select: {}, method: l1_unstructured, amount: 5e-1}\n")
    assert r.seed == 10 and r.steps[0].amount == 0.5
    with pytest.raises(RecipeError, match="'yes': finalize is true, false or compact"):
        parse_recipe("version: 1\nfinalize: yes\nsteps:\n  - {select: {}, method: identity}\n")
