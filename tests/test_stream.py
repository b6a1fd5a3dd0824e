"""Streaming apply: tensor by tensor over safe_open, bit for bit the in-memory ``--format dense``
(or ``hf``) output, for local and global steps and chains, fp32/bf16/fp16, one file, shards and
model folders; the files written read back with safetensors' own readers; atomic; every refusal
clear and made before anything is read; peak memory under the bound."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

safetensors = pytest.importorskip("safetensors")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from prunerecipe import apply_recipe_streaming, parse_recipe, read_state_dict  # noqa: E402
from prunerecipe.cli import cli  # noqa: E402
from prunerecipe.stream import stream_plan  # noqa: E402
from prunerecipe.stream.format import Source, Writer, entries_in_file_order  # noqa: E402

from .conftest import ROOT  # noqa: E402

MODELS = """
import torch
from torch import nn
from prunerecipe.zoo import LeNet

def big():  # 2.6M weights: global groups above 2**20 entries take the cut passes; 4.weight alone is above it
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 1024), nn.Linear(1024, 300), nn.Linear(300, 4096))

def lenet():
    torch.manual_seed(0)
    return LeNet()
"""

RECIPES = {
    # one global L1 step on tensors as stored: one select over the memory map, then folds
    "global": "  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.6, scope: global}\n",
    # global steps after other steps on their tensors: histogram passes; local chains on the holder path
    "chain": (
        "  - {select: {names: ['0']}, method: ln_structured, amount: 0.25, args: {n: 1, dim: 0}}\n"
        "  - {select: {types: [Linear]}, method: l1_unstructured, sparsity: 0.7, scope: global}\n"
        "  - {select: {names: ['2']}, method: l1_unstructured, amount: 0.5}\n"
        "  - {select: {types: [Linear]}, method: l1_unstructured, amount: 100000, scope: global}\n"
        "  - {select: {types: [Linear]}, params: [bias], method: l1_unstructured, amount: 0.5}\n"
    ),
    # local L1 cuts folded straight into the output, or (ties in a tensor of up to 2**20 entries) left to torch
    "local": (
        "  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.3}\n"
        "  - {select: {types: [Linear]}, params: [bias], method: l1_unstructured, sparsity: 0.5}\n"
        "  - {select: {types: [Linear]}, method: l1_unstructured, sparsity: 0.2}\n"  # a no-op, said as in memory
    ),
    # small global groups (pruned whole: torch breaks ties), random steps replayed, structured steps
    "random": (
        "  - {select: {names: [conv1]}, method: random_unstructured, amount: 0.3}\n"
        "  - {select: {names: [conv2]}, method: random_structured, amount: 0.5, args: {dim: 0}}\n"
        "  - {select: {names: [conv2]}, method: random_unstructured, amount: 0.2}\n"  # after whole slices: a known count left
        "  - {select: {types: [Linear, Conv2d]}, method: l1_unstructured, amount: 0.4, scope: global}\n"
        "  - {select: {names: [fc1]}, method: ln_structured, amount: 0.25, args: {n: 2, dim: 0}}\n"
        "  - {select: {names: [fc2, fc3]}, params: [bias], method: random_unstructured, amount: 2}\n"
        "  - {select: {types: [Linear]}, method: l1_unstructured, sparsity: 0.8}\n"
        "  - {select: {types: [Linear]}, params: [bias], method: random_unstructured, amount: 0.5, scope: global}\n"
        "  - {select: {names: [fc1, fc2]}, method: l1_unstructured, sparsity: 0.5, scope: global}\n"  # a no-op on a small group
    ),
    # a global identity step holds no group together: each tensor alone, then the steps after it
    "identity": (
        "  - {select: {types: [Linear, Conv2d]}, method: identity, scope: global}\n"
        "  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.3}\n"
        "  - {select: {types: [Conv2d]}, method: random_unstructured, amount: 0.2}\n"
    ),
}
MODEL_OF = {"global": "big", "chain": "big", "local": "big", "random": "lenet", "identity": "lenet"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture
def setup(tmp_path):
    """(model spec, weights path, recipe path) for a model family, dtype and recipe."""
    (tmp_path / "models.py").write_text(MODELS)
    models: dict = {}
    exec(MODELS, models)

    def make(kind: str, dtype: str, recipe: str, seed: int | None = 4) -> tuple[str, str, str]:
        name = f"{kind}_{dtype}"
        with open(tmp_path / "models.py", "a") as fh:
            fh.write(f"\ndef {name}():\n    return {kind}().to({DTYPES[dtype]})\n")
        model = models[kind]().to(DTYPES[dtype])
        weights = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
        r = tmp_path / f"{recipe}.yaml"
        r.write_text("version: 1\n" + (f"seed: {seed}\n" if seed is not None else "") + "steps:\n" + RECIPES[recipe])
        return f"{tmp_path / 'models.py'}:{name}", str(weights), str(r)

    return make


def run(*args: str) -> str:
    done = CliRunner().invoke(cli, list(args))
    assert done.exit_code == 0, done.output
    return done.output


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_streamed_dense_output_equals_the_in_memory_one_bit_for_bit(setup, tmp_path, recipe, dtype):
    spec, weights, path = setup(MODEL_OF[recipe], dtype, recipe)
    torch.manual_seed(11)
    memory = run("apply", path, "--model", spec, "--weights", weights, "--format", "dense", "-o", str(tmp_path / "mem.safetensors"))
    after_memory = torch.get_rng_state()
    torch.manual_seed(11)
    streamed = run("apply", path, "--model", spec, "--weights", weights, "--stream", "-o", str(tmp_path / "str.safetensors"))
    assert torch.equal(torch.get_rng_state(), after_memory)  # the generator ends where the in-memory run leaves it
    a, b = load_file(tmp_path / "mem.safetensors"), load_file(tmp_path / "str.safetensors")
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype == DTYPES[dtype] and torch.equal(a[key], b[key]), key
    # the same report, and the same metadata (the summary, computed while writing)
    assert memory.splitlines()[:-1] == streamed.splitlines()[:-1]
    with safe_open(tmp_path / "mem.safetensors", "pt") as fa, safe_open(tmp_path / "str.safetensors", "pt") as fb:
        assert fa.metadata() == fb.metadata()


def test_a_sharded_index_in_and_the_dense_output_match(setup, tmp_path):
    spec, weights, path = setup("big", "bf16", "chain")
    state = load_file(weights)
    names = list(state)
    save_file({k: state[k] for k in names[:3]}, tmp_path / "a.safetensors")
    save_file({k: state[k] for k in names[3:]}, tmp_path / "b.safetensors")
    index = {"metadata": {}, "weight_map": {k: ("a.safetensors" if i < 3 else "b.safetensors") for i, k in enumerate(names)}}
    (tmp_path / "w.safetensors.index.json").write_text(json.dumps(index))
    run("apply", path, "--model", spec, "--weights", weights, "--format", "dense", "-o", str(tmp_path / "mem.safetensors"))
    run("apply", path, "--model", spec, "--weights", str(tmp_path / "w.safetensors.index.json"), "--stream", "-o", str(tmp_path / "s.safetensors"))
    a, b = load_file(tmp_path / "mem.safetensors"), load_file(tmp_path / "s.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_hugging_face_folder_round_trips_with_shards_in_and_out(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=768,
        vocab_size=512,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "llama", max_shard_size="1MB")
    (tmp_path / "llama" / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "version: 1\nmodel: llama\nsteps:\n"
        '  - {select: {names: ["model.layers.0.mlp.*"]}, method: random_unstructured, amount: 0.1, seed: 1}\n'
        '  - {select: {types: [Linear], names: ["model.layers.*"]}, method: l1_unstructured, sparsity: 0.5, scope: global}\n'
    )
    run("apply", str(recipe), "-o", str(tmp_path / "mem"), "--max-shard-size", "2MB")
    line = run("apply", str(recipe), "-o", str(tmp_path / "str"), "--max-shard-size", "2MB", "--stream").splitlines()[-1]
    assert "Hugging Face folder, 2 safetensors file(s)" in line
    mem, got = tmp_path / "mem", tmp_path / "str"
    assert sorted(os.listdir(mem)) == sorted(os.listdir(got))
    a, b = read_state_dict(mem), read_state_dict(got)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("prunerecipe.json", "model.safetensors.index.json", "config.json", "tokenizer_config.json"):
        assert json.loads((mem / name).read_text()) == json.loads((got / name).read_text()), name
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        with safe_open(mem / shard, "pt") as fa, safe_open(got / shard, "pt") as fb:
            assert fa.metadata() == fb.metadata() and sorted(fa.keys()) == sorted(fb.keys())
    _, info = transformers.AutoModelForCausalLM.from_pretrained(got, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.bool, torch.uint8])
def test_written_files_read_back_with_safe_open_and_load_file(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": (torch.randn(7, 5, generator=g) * 10).to(dtype),
        "bias": torch.randn(3, generator=g).to(torch.bfloat16),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "odd": torch.randn(3, generator=g).half(),
    }
    entries = entries_in_file_order([(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()])
    path = tmp_path / "t.safetensors"
    with open(path, "wb") as fh:
        writer = Writer(fh, entries, {"summary": "x" * 200})
        for name, _, _ in entries:
            writer.write(name, tensors[name])
        with pytest.raises(ValueError, match="expected"):
            writer.write("w", tensors["w"])  # every tensor once, in the header's order
        writer.finish({"summary": json.dumps({"n": 1})})
    loaded = load_file(path)
    assert sorted(loaded) == sorted(tensors) and all(torch.equal(loaded[k], tensors[k]) and loaded[k].dtype == tensors[k].dtype for k in tensors)
    with safe_open(path, "pt") as fh:
        assert fh.metadata() == {"summary": '{"n": 1}'}
    header = int.from_bytes(path.read_bytes()[:8], "little")
    assert (8 + header) % 8 == 0  # data starts 8-aligned; wider dtypes come first
    source = Source(str(path))
    assert torch.equal(source.tensor("w"), tensors["w"])


@pytest.mark.parametrize("recipe", ["chain", "global", "local"])
def test_a_failure_midway_leaves_no_output(setup, tmp_path, recipe):
    spec, weights, path = setup("big", "fp32", recipe)
    state = load_file(weights)
    state["3.weight"][3, 3] = float("nan")  # a tensor pruned late in the write pass
    save_file(state, weights)
    for fmt, out in (("dense", tmp_path / "o.safetensors"), ("hf", tmp_path / "o")):
        done = CliRunner().invoke(cli, ["apply", path, "--model", spec, "--weights", weights, "--stream", "--format", fmt, "-o", str(out)])
        assert done.exit_code == 1, done.output
        if fmt == "dense":
            assert "3.weight has 1 NaN and 0 infinite entries; refusing to prune a diverged model" in done.output, done.output
            assert "Traceback" not in done.output
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prunerecipe-")]


def test_what_cannot_be_streamed_is_refused_before_anything_is_read(setup, tmp_path, write_recipe):
    spec, weights, path = setup("lenet", "fp32", "random")
    pt = tmp_path / "w.pt"
    torch.save(load_file(weights), pt)

    def fails(*args: str) -> str:
        done = CliRunner().invoke(cli, ["apply", *args, "--stream"])
        assert done.exit_code == 1, done.output
        assert "Traceback" not in done.output
        return done.output

    out = str(tmp_path / "o.safetensors")
    assert "--format torch cannot be streamed" in fails(
        path, "--model", spec, "--weights", weights, "--format", "torch", "-o", str(tmp_path / "o.pt")
    )
    assert "--stream writes safetensors" in fails(path, "--model", spec, "--weights", weights, "-o", str(tmp_path / "o.pt"))
    assert "'.pt' files cannot be streamed" in fails(path, "--model", spec, "--weights", str(pt), "-o", out)
    scheduled = write_recipe(
        """
        version: 1
        steps:
          - {name: gradual, select: {names: [fc1]}, method: l1_unstructured, sparsity: 0.5, schedule: {start: 0, end: 2}}
          - {name: later, select: {names: [conv1]}, method: random_unstructured, amount: 0.1}
          - {name: after-global, select: {types: [Linear]}, method: l1_unstructured, amount: 0.5, scope: global}
          - {name: drawn, select: {names: [fc2]}, method: random_unstructured, amount: 0.5}
        """,
        "sched.yaml",
    )
    text = fails(str(scheduled), "--model", spec, "--weights", weights, "-o", out)
    assert "steps[0].schedule: a step with a schedule runs during training" in text
    assert "steps[3]: random_unstructured draws as many random numbers as fc2.weight has entries left" in text
    assert "steps[1]" not in text
    # a checkpoint with masks, and one that does not fit
    from prunerecipe import apply_recipe
    from prunerecipe.zoo import LeNet

    model = LeNet()
    apply_recipe(model, parse_recipe("version: 1\nsteps:\n  - {select: {names: [fc1]}, method: l1_unstructured, amount: 0.5}\n"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "masked.safetensors")
    assert "--stream reads dense checkpoints" in fails(path, "--model", spec, "--weights", str(tmp_path / "masked.safetensors"), "-o", out)
    partial = load_file(weights)
    del partial["fc3.bias"]
    save_file(partial, tmp_path / "partial.safetensors")
    assert "missing from the checkpoint: fc3.bias" in fails(path, "--model", spec, "--weights", str(tmp_path / "partial.safetensors"), "-o", out)
    assert not os.path.exists(out)


def test_a_plugin_method_is_refused_at_plan_time(setup, tmp_path, write_recipe):
    import torch.nn.utils.prune as prune

    from prunerecipe import register_method

    class Half(prune.BasePruningMethod):
        PRUNING_TYPE = "unstructured"

        def compute_mask(self, t, default_mask):
            return default_mask

    register_method("half_keep", Half)
    spec, weights, _ = setup("lenet", "fp32", "random")
    recipe = parse_recipe("version: 1\nsteps:\n  - {name: mine, select: {names: [fc1]}, method: half_keep}\n", source="mine.yaml")
    from prunerecipe.errors import RecipeError
    from prunerecipe.stream import meta_model

    model, _ = meta_model(spec)
    with pytest.raises(RecipeError, match=r"steps\[0\]\.method: method 'half_keep' cannot be streamed"):
        stream_plan(model, recipe, weights)


def test_plan_stream_shows_the_passes_and_the_memory_bound(setup):
    spec, weights, path = setup("big", "fp32", "chain")
    text = run("plan", path, "--model", spec, "--weights", weights, "--stream")
    assert "passes 1-2 of 5: read 4 tensors (9.9 MiB each pass) for the exact cut of steps[1]" in text and "earlier steps rerun" in text
    assert "pass 5 of 5: read 8 tensors (9.9 MiB), prune 8, write 8 (9.9 MiB)" in text
    assert "memory bound: 4 x 4.7 MiB (largest tensor: 4.weight) + 256.0 MiB" in text
    data = json.loads(run("plan", path, "--model", spec, "--weights", weights, "--stream", "--json"))
    assert data["stream"]["passes"] == 5 and data["stream"]["memory_bound"] == 4 * 300 * 4096 * 4 + 256 * 2**20
    spec, weights, path = setup("big", "bf16", "global")
    assert "pass 1 of 2: read 4 tensors (4.9 MiB each pass) for the exact cut of steps[0] (global group of 2584576 entries; a histogram" in run(
        "plan", path, "--model", spec, "--weights", weights, "--stream"
    )


def test_the_library_call_reports_progress_and_returns_the_report(setup, tmp_path):
    spec, weights, path = setup("big", "bf16", "chain")
    seen = []
    report = apply_recipe_streaming(spec, path, weights, tmp_path / "o.safetensors", progress=seen.append)
    assert {p.number for p in seen} == {1, 2, 3} and seen[-1].tensors == seen[-1].tensors_total == 8  # bf16: one pass per cut
    assert seen[-1].bytes == seen[-1].bytes_total == sum(t.numel() * t.element_size() for t in load_file(weights).values())
    assert report["0.weight"].after > 0.25 and report.numel == sum(t.numel() for t in load_file(weights).values())


@pytest.mark.slow
def test_peak_memory_stays_under_the_bound(tmp_path):
    """24 tensors of 16 MiB (384 MiB): the bound is 4 x 16 MiB + 256 MiB = 320 MiB (more where
    torch's random_unstructured ranks a tensor); pruning in memory needs the weights and their
    masks (768 MiB and more)."""
    script = textwrap.dedent(
        f"""
        import sys, threading, time, torch
        from torch import nn
        from safetensors.torch import save_file
        sys.path.insert(0, {str(tmp_path)!r})

        def anon():
            with open('/proc/self/status') as fh:
                return next(int(line.split()[1]) * 1024 for line in fh if line.startswith('RssAnon'))

        def build():
            return nn.Sequential(*[nn.Linear(1024, 4096, bias=False) for _ in range(24)])

        with torch.device('meta'):
            meta = build()
        if sys.argv[1] == 'make':
            g = torch.Generator().manual_seed(0)
            save_file({{f'{{i}}.weight': torch.randn(4096, 1024, generator=g) for i in range(24)}}, {str(tmp_path / "w.safetensors")!r})
            sys.exit(0)
        from prunerecipe import apply_recipe_streaming, parse_recipe
        from prunerecipe.stream import stream_plan
        recipe = parse_recipe(sys.argv[2])
        bound = stream_plan(meta, recipe, {str(tmp_path / "w.safetensors")!r}).bound
        peak, base, stop = [0], anon(), []
        def watch():
            while not stop:
                peak[0] = max(peak[0], anon())
                time.sleep(0.002)
        t = threading.Thread(target=watch); t.start()
        apply_recipe_streaming(meta, recipe, {str(tmp_path / "w.safetensors")!r}, sys.argv[3], force=True)
        stop.append(1); t.join()
        print(peak[0] - base, bound)
        """
    )
    (tmp_path / "m.py").write_text(script)
    assert subprocess.run([sys.executable, str(tmp_path / "m.py"), "make"], timeout=300).returncode == 0
    for steps, expected in (
        ("  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5, scope: global}\n", 4 * 16 + 256),
        (
            "  - {select: {names: ['0', '1']}, method: ln_structured, amount: 0.25, args: {n: 1, dim: 0}}\n"
            "  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5, scope: global}\n",
            4 * 16 + 256,
        ),
        # torch's random_unstructured ranks a whole tensor: 32 bytes an entry
        ("  - {select: {names: ['0', '5']}, method: random_unstructured, amount: 0.3, seed: 1}\n", 32 * 4 + 256),
    ):
        done = subprocess.run(
            [sys.executable, str(tmp_path / "m.py"), "run", "version: 1\nsteps:\n" + steps, str(tmp_path / "o.safetensors")],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=ROOT,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        peak, bound = map(int, done.stdout.split()[-2:])
        assert bound == expected * 2**20
        assert peak < bound, f"peak {peak / 2**20:.0f} MiB over the interpreter's, bound {bound / 2**20:.0f} MiB"


def test_progress_is_shown_on_a_terminal_only(setup, tmp_path, monkeypatch):
    from prunerecipe.cli import apply as cli_module
    from prunerecipe.stream.run import Progress

    assert cli_module._stream_progress() is None  # not a terminal here
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    shown = []
    monkeypatch.setattr(cli_module.click, "echo", lambda text="", err=False, nl=True: shown.append((text, err, nl)))
    show = cli_module._stream_progress()
    assert show is not None
    show(Progress("prune and write", 2, 2, 1, 4, 10**9, 4 * 10**9))
    show(Progress("prune and write", 2, 2, 4, 4, 4 * 10**9, 4 * 10**9))
    last, err, nl = shown[-1]
    assert err and nl and "pass 2/2 prune and write: 4/4 tensors, 4.00/4.00 GB" in last and "MB/s" in last


def test_plan_stream_without_weights_and_apply_stream_without_any(setup, tmp_path):
    spec, _, path = setup("big", "bf16", "global")
    text = run("plan", path, "--model", spec, "--stream")
    assert "streaming: (the checkpoint given at apply) -> --format dense" in text and "memory bound: 4 x 2.3 MiB (largest tensor: 4.weight)" in text
    done = CliRunner().invoke(cli, ["apply", path, "--model", spec, "--stream", "-o", str(tmp_path / "o.safetensors")])
    assert done.exit_code == 2 and "--stream needs --weights" in done.output


def test_the_bound_covers_torchs_random_ranking():
    """random_unstructured ranks its whole tensor with torch's topk: the bound says so."""
    from torch import nn

    from prunerecipe.stream.planned import RANDOM_BYTES_PER_ENTRY, SLACK

    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(1024, 4096, bias=False), nn.Linear(512, 512, bias=False))
    plain = stream_plan(model, parse_recipe("version: 1\nsteps:\n  - {select: {names: ['1']}, method: random_unstructured, amount: 0.5}\n"), None)
    assert plain.bound == 4 * 1024 * 4096 * 4 + SLACK
    drawn = stream_plan(model, parse_recipe("version: 1\nsteps:\n  - {select: {names: ['0']}, method: random_unstructured, amount: 0.5}\n"), None)
    assert drawn.bound == RANDOM_BYTES_PER_ENTRY * 1024 * 4096 + SLACK and "torch's random_unstructured ranks them whole" in str(drawn)


def test_a_key_prefix_is_removed_as_in_memory(setup, tmp_path):
    spec, weights, path = setup("lenet", "fp32", "random")
    save_file({f"net.{k}": v for k, v in load_file(weights).items()}, tmp_path / "prefixed.safetensors")
    args = [path, "--model", spec, "--weights", str(tmp_path / "prefixed.safetensors")]
    memory = CliRunner().invoke(cli, ["apply", *args, "--format", "dense", "-o", str(tmp_path / "m.safetensors")])
    streamed = CliRunner().invoke(cli, ["apply", *args, "--stream", "-o", str(tmp_path / "s.safetensors")])
    assert memory.exit_code == streamed.exit_code == 0, streamed.output
    assert "removed the key prefix 'net.'" in memory.stderr and "removed the key prefix 'net.'" in streamed.stderr
    a, b = load_file(tmp_path / "m.safetensors"), load_file(tmp_path / "s.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a) and "conv1.weight" in a


def test_global_identity_holds_nothing_together_and_merged_groups_raise_the_bound_honestly():
    from prunerecipe.stream.planned import SLACK, TIMES_LARGEST

    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256, bias=False) for _ in range(6)])
    ident = parse_recipe(
        "version: 1\nsteps:\n  - {select: {types: [Linear]}, method: identity, scope: global}\n"
        "  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5}\n"
    )
    sp = stream_plan(model, ident, None)
    assert all(len(u) == 1 for u in sp.units) and sp.bound == TIMES_LARGEST * 256 * 256 * 4 + SLACK
    # pairs (0,1), (1,2), ... each small, but overlapping: one unit of six tensors held whole
    pairs = "".join(f"  - {{select: {{names: ['{i}', '{i + 1}']}}, method: l1_unstructured, amount: 0.1, scope: global}}\n" for i in range(5))
    sp = stream_plan(model, parse_recipe("version: 1\nsteps:\n" + pairs), None)
    unit, size = sp.largest_unit
    assert len(unit) == 6 and size == 6 * 256 * 256 * 4
    assert sp.bound == TIMES_LARGEST * size + SLACK and "the largest group pruned whole in memory: 6 tensors" in str(sp)


@pytest.mark.parametrize("stream", [True, False])
def test_sigterm_while_writing_leaves_no_output_and_no_temp_file(setup, tmp_path, stream):
    """``kill`` (a scheduler's time limit) mid-write unwinds like Ctrl-C: exit 143, the temp file
    beside the output removed (the default action would leave a hidden multi-GB file)."""
    spec, weights, path = setup("big", "fp32", "global")
    out = tmp_path / "o.safetensors"
    code = textwrap.dedent(
        """
        import os, signal, sys
        real = os.fsync
        def fsync(fd):  # the output is complete in its temp file: the moment before the rename
            os.kill(os.getpid(), signal.SIGTERM)
            real(fd)
        os.fsync = fsync
        from prunerecipe.cli import main
        main(sys.argv[1:])
        """
    )
    args = ["apply", path, "--model", spec, "--weights", weights, "--format", "dense", "-o", str(out)] + (["--stream"] if stream else [])
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 143, done.stderr
    assert "terminated (SIGTERM)" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prunerecipe-")]


def test_a_full_disk_midway_is_a_clear_error_and_leaves_nothing(setup, tmp_path, monkeypatch):
    import errno

    import prunerecipe.stream.direct as direct

    monkeypatch.setattr(direct, "STAGE", 1 << 16)  # many writes, so the failure comes midway
    spec, weights, path = setup("big", "fp32", "global")
    real, calls = os.pwrite, []

    def pwrite(fd, buf, offset):
        calls.append(offset)
        if len(calls) > 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, buf, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    out = tmp_path / "o.safetensors"
    done = CliRunner().invoke(cli, ["apply", path, "--model", spec, "--weights", weights, "--stream", "--format", "dense", "-o", str(out)])
    assert done.exit_code == 1, done.output
    assert "o.safetensors: cannot write it: No space left on device" in done.output
    assert "Traceback" not in done.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prunerecipe-")]
