"""``core/grid.py`` and ``core/grid_cells.py``: axis parsing, A1111's ranges, errors, cell order, each cell's
parameters."""

from __future__ import annotations

import random

import pytest

from sdrepl.core.errors import UsageError
from sdrepl.core.grid import (
    Axis,
    AxisValue,
    check_count,
    parse_axes,
    parse_axis,
    split_values,
    with_snapshots,
)
from sdrepl.core.grid_cells import (
    OverlayLookup,
    cell_params,
    cell_snapshot,
    check_search,
    fix_random_seeds,
    grid_parameters,
    plan_cells,
    set_lora_weight,
)
from sdrepl.core.limits import MAX_GRID_CELLS
from sdrepl.core.prompt import StaticLookup


def values(spec: str) -> list:
    return [v.value for v in parse_axis(spec).values]


def typed(spec: str) -> list[str]:
    return [v.typed for v in parse_axis(spec).values]


@pytest.mark.parametrize(("spec", "expected"), [
    ("seed=1,2,3", [1, 2, 3]),
    ("seed=1-4", [1, 2, 3, 4]),
    ("seed=1-10 (+3)", [1, 4, 7, 10]),
    ("seed=10-1 (-3)", [10, 7, 4, 1]),
    ("seed=4-1", [4, 3, 2, 1]),
    ("steps=10-20 [3]", [10, 15, 20]),
    ("steps = 5, 8 ,13", [5, 8, 13]),
    ("seed=-1", [-1]),
    ("cfg=5,7.5", [5.0, 7.5]),
    ("cfg=5-9 (+2)", [5.0, 7.0, 9.0]),
    ("cfg=1-2 [5]", [1.0, 1.25, 1.5, 1.75, 2.0]),
    ("cfg=0.1-0.3 (+0.1)", [0.1, 0.2, 0.3]),
    ("ckpt=cat:500,1000", [500, 1000]),
    ("ckpt=cat=500-1500 (+500)", [500, 1000, 1500]),
    ("lora=style:0,0.4,0.8", [0.0, 0.4, 0.8]),
    ("lora=style=0-1 [3]", [0.0, 0.5, 1.0]),
    ("size=512x512,768x512,640", [(512, 512), (768, 512), (640, 640)]),
    ("sampler=Euler a,k_dpmpp_2m,DDIM", ["Euler a", "DPM++ 2M", "DDIM"]),
    ('sr=cat,"red, fox",dog', ["cat", "red, fox", "dog"]),
])
def test_values_and_ranges(spec, expected):
    assert values(spec) == pytest.approx(expected) if isinstance(expected[0], float) else values(spec) == expected


def test_values_keep_what_was_typed_and_write_range_members_out():
    assert typed("cfg=5,7.50") == ["5", "7.50"]
    assert typed("cfg=0.1-0.3 (+0.1)") == ["0.1", "0.2", "0.3"]  # no binary noise in labels
    assert typed("seed=1-3") == ["1", "2", "3"]
    assert typed("sampler=k_euler") == ["k_euler"]  # as typed; the value is the canonical name


@pytest.mark.parametrize(("head", "kind"), [("CFG Scale", "cfg"), ("cfg_scale", "cfg"), ("Prompt S/R", "sr"),
                                            ("Seed", "seed"), ("sampler name", "sampler"), ("LoRA", "lora"),
                                            ("checkpoint", "ckpt")])
def test_a1111_axis_spellings(head, kind):
    value = {"lora": "cat:1", "ckpt": "cat:1", "sampler": "DDIM"}.get(kind, "1")
    assert parse_axis(f"{head}={value}").kind == kind


def test_named_axes_keep_their_name():
    axis = parse_axis("lora=<my-style>:0,1")
    assert (axis.kind, axis.name) == ("lora", "my-style")
    every = parse_axis("ckpt=cat")
    assert every.every_snapshot and every.values == () and every.name == "cat"
    assert parse_axis("ckpt=cat:all").every_snapshot


@pytest.mark.parametrize(("spec", "message"), [
    ("foo=1,2", "unknown axis 'foo'"),
    ("cgf=1,2", "did you mean cfg"),
    ("cfg", "write AXIS=VALUES"),
    ("cfg=", "no values"),
    ("cfg=abc", "'abc' is not a number"),
    ("cfg=101", "out of range"),
    ("steps=0", "out of range"),
    ("steps=1.5", "not a whole number"),
    ("seed=-5", "out of range"),
    ("seed=1-5 (-1)", "never gets from 1 to 5"),
    ("seed=1-100000", "more than a grid's"),
    ("size=500x512", "multiples of 8"),
    ("size=big", "not a size"),
    ("sampler=Euler b", "unknown sampler"),
    ("lora=:0,1", "name the LoRA"),
    ("lora=style", "no values"),
    ("lora=style:200", "out of range"),
    ("ckpt=:500", "name the embedding"),
    ("lora=a>b:1", "holds < or >"),
    ("ckpt=cat:-5", "must be 0 or more"),
])
def test_bad_axes_say_what_and_how(spec, message):
    with pytest.raises(UsageError, match="--x") as info:
        parse_axis(spec, "--x")
    assert message in str(info.value)


def test_axes_need_x_and_no_repeats_and_a_bounded_cell_count():
    with pytest.raises(UsageError, match="needs an x axis"):
        parse_axes(None, "cfg=1,2")
    with pytest.raises(UsageError, match="--y .* already sweeps"):
        parse_axes("cfg=1,2", "cfg_scale=3")
    parse_axes("sr=cat,dog", "sr=red,blue")  # two S/R axes over different words are fine (A1111)
    parse_axes("lora=a:0,1", "lora=b:0,1")
    side = int(MAX_GRID_CELLS ** 0.5) + 1
    with pytest.raises(UsageError, match=rf"{side} x {side} = {side * side} cells, more than {MAX_GRID_CELLS}"):
        parse_axes(f"seed=1-{side}", f"steps=1-{side}")
    many = with_snapshots(parse_axis("ckpt=cat"), list(range(0, 10 * (MAX_GRID_CELLS + 1), 10)), "--x")
    with pytest.raises(UsageError, match=rf"!grid: {MAX_GRID_CELLS + 1} cells, .*e.g. ckpt=cat:0,{MAX_GRID_CELLS}0"):
        check_count([many, None, None])


def test_cells_run_x_fastest_then_y_then_z():
    axes = parse_axes("seed=1,2", "cfg=3,4", "steps=5,6")
    cells = plan_cells(axes)
    assert len(cells) == 8
    assert [(c.x.value, c.y.value, c.z.value) for c in cells[:3]] == [(1, 3.0, 5), (2, 3.0, 5), (1, 4.0, 5)]
    assert [(c.ix, c.iy, c.iz) for c in cells] == [(x, y, z) for z in range(2) for y in range(2) for x in range(2)]
    only_x = plan_cells(parse_axes("seed=1,2,3"))
    assert [(c.y, c.z) for c in only_x] == [(None, None)] * 3


def test_cell_params_override_the_line_and_keep_the_rest():
    base = {"prompt": "a cat on a mat", "negative": "ugly cat", "steps": 20, "cfg": 7.0, "seed": 9,
            "sampler": "Euler a", "width": 64, "height": 64}
    axes = parse_axes("sr=cat,dog", "size=32x48", "cfg=3")
    cell = plan_cells(axes)[0]
    assert cell_params(base, axes, cell) == {**base, "width": 32, "height": 48, "cfg": 3.0}
    second = plan_cells(parse_axes("sr=cat,dog"))[1]
    params = cell_params(base, parse_axes("sr=cat,dog"), second)
    assert params["prompt"] == "a dog on a mat" and params["negative"] == "ugly dog"  # A1111 replaces in both
    assert base["prompt"] == "a cat on a mat"  # the line's parameters are not changed


def test_every_axis_kind_lands_in_its_parameter():
    axes = parse_axes("seed=5", "steps=3", "sampler=DDIM")
    params = cell_params({"prompt": "p"}, axes, plan_cells(axes)[0])
    assert params == {"prompt": "p", "seed": 5, "steps": 3, "sampler": "DDIM"}


def test_search_replace_needs_its_first_value_in_the_prompt():
    axes = parse_axes("sr=dog,cat")
    with pytest.raises(UsageError, match="'dog', which is not in the prompt"):
        check_search(axes, "a cat", "")
    check_search(axes, "a cat", "no dog")  # the negative prompt counts too (A1111)


@pytest.mark.parametrize(("prompt", "expected"), [
    ("a cat", "a cat <lora:style:0.4>"),
    ("a cat <lora:style:1>", "a cat <lora:style:0.4>"),
    ("a <lora:Style:1:0.5> cat", "a <lora:style:0.4> cat"),
    ("a <lora:other:1> cat", "a <lora:other:1> cat <lora:style:0.4>"),
    ("a \\<lora:style:1> cat", "a \\<lora:style:1> cat <lora:style:0.4>"),
])
def test_lora_weight_is_set_in_the_prompt(prompt, expected):
    assert set_lora_weight(prompt, "style", 0.4) == expected


def test_lora_axis_cells_and_zero_weight():
    axes = parse_axes("lora=style:0,1")
    cells = plan_cells(axes)
    assert [cell_params({"prompt": "a cat"}, axes, c)["prompt"] for c in cells] == [
        "a cat <lora:style:0>", "a cat <lora:style:1>"]


def test_random_seeds_are_drawn_once_per_grid():
    axes = parse_axes("seed=-1,7,-1", "cfg=1,2")
    fixed = fix_random_seeds(axes, random.Random(3))
    seeds = [v.value for v in fixed[0].values]
    assert seeds[1] == 7 and -1 not in seeds and seeds[0] != seeds[2]
    assert [v.typed for v in fixed[0].values] == ["-1", "7", "-1"]
    assert fixed[1] is axes[1]
    cells = plan_cells(fixed)
    assert cells[0].x.value == cells[3].x.value  # the same random seed in every row
    assert fixed[0].label(fixed[0].values[0]) == f"Seed: {seeds[0]}"


def test_snapshot_steps_are_checked_or_filled():
    every = parse_axis("ckpt=cat")
    filled = with_snapshots(every, [1000, 500, 1500], "--x")
    assert [v.value for v in filled.values] == [500, 1000, 1500] and not filled.every_snapshot
    assert [filled.label(v) for v in filled.values] == ["cat-500", "cat-1000", "cat-1500"]
    some = parse_axis("ckpt=cat:1000")
    assert with_snapshots(some, [500, 1000], "--x") is some
    with pytest.raises(UsageError, match="no snapshot of cat at step 700; its snapshots are at steps 500, 1000"):
        with_snapshots(parse_axis("ckpt=cat:700"), [500, 1000], "--x")
    axes = [filled, None, None]
    assert cell_snapshot(axes, plan_cells(axes)[1]) == ("cat", 1000)


def test_labels_follow_a1111():
    axes = parse_axes("cfg=7", "sampler=Euler a", "lora=style:0.5")
    assert [a.label(a.values[0]) for a in axes] == ["CFG Scale: 7", "Euler a", "style: 0.5"]
    assert parse_axis("sr=cat").label(AxisValue("cat", "cat")) == "cat"
    assert parse_axis("size=64x32").label(AxisValue("64x32", (64, 32))) == "Size: 64x32"


def test_grid_parameters_are_the_first_cells_plus_the_plot():
    first = "a cat\nNegative prompt: ugly\nSteps: 2, Sampler: Euler a, CFG scale: 3, Seed: 5"
    axes = [parse_axis("cfg=3,7"), None, with_snapshots(parse_axis("ckpt=cat"), [1, 2], "--z")]
    text = grid_parameters(first, axes)
    lines = text.split("\n")
    assert lines[:2] == ["a cat", "Negative prompt: ugly"]
    assert lines[2].startswith("Steps: 2, Sampler: Euler a, CFG scale: 3, Seed: 5, Script: X/Y/Z plot, ")
    assert 'X Type: CFG Scale, X Values: "3, 7"' in lines[2]
    assert 'Z Type: Embedding checkpoint cat, Z Values: "1, 2"' in lines[2] and "Y Type" not in lines[2]
    seeds = grid_parameters(first, [parse_axis("seed=1,2"), None, None])
    assert 'Fixed X Values: "1, 2"' in seeds


def test_overlay_lookup_points_one_name_at_a_snapshot(tmp_path):
    import torch

    from sdrepl.core.embedding import SINGLE, Embedding, EmbeddingData

    def emb(name: str, value: float) -> Embedding:
        data = EmbeddingData({SINGLE: torch.full((1, 4), value)})
        return Embedding(name, name, tmp_path / f"{name}.pt", data, f"{value}" * 12)

    library = StaticLookup([emb("cat", 1.0), emb("dog", 2.0)])
    overlay = OverlayLookup(library, {"Cat": emb("cat", 5.0)})
    assert overlay.get("CAT").vectors[SINGLE][0, 0] == 5.0
    assert overlay.get("dog") is library.get("dog")
    assert overlay.get("bird") is None
    alone = OverlayLookup(StaticLookup(), {"fresh": emb("fresh", 1.0)})
    assert alone.triggers() == ["fresh"]  # a snapshot of a not yet published embedding is a bare name too


def test_split_values_reads_csv_like_a1111():
    assert split_values('a, "b, c" ,d,,') == ["a", "b, c", "d"]
    assert split_values("") == []


def test_axis_key_tells_repeats_apart():
    assert Axis("sr", (AxisValue("cat", "cat"),)).key != Axis("sr", (AxisValue("dog", "dog"),)).key
    assert parse_axis("lora=A:1").key == parse_axis("lora=a:0").key


def test_a_grids_parameters_give_its_axes_back():
    from sdrepl.core.grid_cells import axes_from_parameters
    from sdrepl.core.pnginfo import parse_parameters

    axes = [parse_axis('sr=cat,"red, fox"'), fix_random_seeds([parse_axis("seed=-1,4")], random.Random(1))[0],
            with_snapshots(parse_axis("ckpt=cat"), [10, 20], "--z")]
    text = grid_parameters("a cat\nSteps: 2, Sampler: Euler a, CFG scale: 3, Seed: 5, Size: 64x64", axes)
    specs = axes_from_parameters(parse_parameters(text)["extra"])
    drawn = axes[1].values[0].value
    assert specs == {"x": 'sr=cat, "red, fox"', "y": f"seed={drawn}, 4", "z": "ckpt=cat:10, 20"}
    again = parse_axes(specs["x"], specs["y"], specs["z"])
    assert [v.value for v in again[0].values] == ["cat", "red, fox"] and again[1].values[0].value == drawn
    lora = grid_parameters("p\nSteps: 2", [parse_axis("lora=style:0,0.5"), parse_axis("cfg=3,7"), None])
    assert axes_from_parameters(parse_parameters(lora)["extra"]) == {"x": "lora=style:0, 0.5", "y": "cfg=3, 7"}
    assert axes_from_parameters({"Steps": 2}) is None
    assert axes_from_parameters({"Script": "X/Y/Z plot", "X Type": "Hires upscaler", "X Values": "a"}) is None
