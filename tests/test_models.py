"""models/: cutting timm backbones, sharing plans, the multi-task network, accounting."""

from __future__ import annotations

import pytest

from contract.plan import PlanError, group_rows, parse_plan

UNITS = ["stem", "b1", "b2", "b3", "b4"]
TASKS = ["a", "b", "c"]


# -- plans (pure Python) -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("plan", "names", "variants"),
    [
        ("bottom:2", ["stem", "trunk", "head"], [3, 1, 3]),
        ("top:3", ["trunk", "branch", "head"], [1, 3, 3]),
        ("shared", ["trunk", "head"], [1, 3]),
        ("independent", ["body", "head"], [3, 3]),
    ],
)
def test_plan_kinds_resolve_to_segments(plan, names, variants):
    segs = parse_plan(plan, TASKS, UNITS)
    assert [s.name for s in segs] == names
    assert [len(s.variants) for s in segs] == variants
    body_units = [u for s in segs[:-1] for u in s.units]
    assert body_units == UNITS


def test_bottom_k_puts_exactly_k_units_in_the_stem():
    segs = parse_plan("bottom:3", TASKS, UNITS)
    assert segs[0].units == ("stem", "b1", "b2")
    assert segs[0].assignment == {"a": "a", "b": "b", "c": "c"}
    assert segs[1].assignment == {"a": "shared", "b": "shared", "c": "shared"}


def test_explicit_plan_with_grouped_tasks():
    plan = {"b1": {"a": "ab", "b": "ab", "c": "c"}, "b4": "shared"}
    segs = parse_plan(plan, TASKS, UNITS)
    assert [s.name for s in segs] == ["stem", "trunk", "head"]
    assert segs[0].variants == ("ab", "c")
    assert segs[0].units == ("stem", "b1")


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ("bottom:0", "out of range"),
        ("bottom:5", "out of range"),
        ("top:x", "integer"),
        ("middle:2", "unknown plan"),
        ({"b1": {"a": "x", "b": "x", "zz": "x"}, "b4": "shared"}, "unknown task"),
        ({"b1": {"a": "x", "b": "x"}, "b4": "shared"}, "no variant for task"),
        ({"b1": "shared"}, "must end at the last unit"),
        ({"nope": "shared"}, "unknown unit"),
        ({"b3": "shared", "b1": "shared"}, "out of order"),
    ],
)
def test_bad_plans_are_clear_errors(plan, message):
    with pytest.raises(PlanError, match=message):
        parse_plan(plan, TASKS, UNITS)


def test_group_rows_keeps_first_appearance_order():
    assert group_rows(["b", "a", "b", "c", "a"]) == [("b", [0, 2]), ("a", [1, 4]), ("c", [3])]
    assert group_rows([]) == []


# -- torch side ----------------------------------------------------------------------------
torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from contract.accounting import account, closest_cut  # noqa: E402
from models.backbone import BackboneError, body_units, create_backbone  # noqa: E402
from models.network import MultiTaskNet  # noqa: E402

BACKBONES = [
    "resnet10t",
    "resnet18",
    "resnet34",
    "resnet50",
    "efficientnet_b0",
    "mobilenetv3_small_100",
    "convnext_atto",
]


@pytest.mark.parametrize("name", BACKBONES)
def test_units_chain_to_forward_features(name):
    model = create_backbone(name, num_classes=3).eval()
    units = body_units(model)
    assert units[0].name == "stem"
    ends = [u.name for u in units if u.stage_end]
    for info in model.feature_info:  # timm's stage boundaries are a subset of our cuts
        stem_like = info["module"] in ("act1", "bn1")
        assert stem_like or any(n.startswith(info["module"] + ".") for n in ends), info
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h = x
        for u in units:
            for p in u.paths:
                h = model.get_submodule(p)(h)
        expected = model.forward_features(x)
        if type(model).__name__ == "MobileNetV3":  # the body holds its pooled conv_head too
            h, expected = h.flatten(1), model.forward_head(expected, pre_logits=True)
        assert torch.allclose(h, expected, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "mobilenetv3_small_100", "convnext_atto"])
@pytest.mark.parametrize("plan", ["bottom:2", "top:4", "shared", "independent", "explicit"])
def test_identical_variants_equal_the_plain_timm_model(name, plan):
    torch.manual_seed(0)
    template = create_backbone(name, num_classes=5).eval()
    units = [u.name for u in body_units(create_backbone(name, num_classes=5))]
    if plan == "explicit":
        plan = {units[1]: {"a": "ab", "b": "ab", "c": "c"}, units[-2]: "shared", units[-1]: "per_task"}
    net = MultiTaskNet(name, {"a": 5, "b": 5, "c": 5}, plan, template=template).eval()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        expected = template.forward_head(template.forward_features(x))
        got = net(x, torch.tensor([0, 1, 2, 2, 1, 0]))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("plan", ["bottom:2", "top:3", "independent"])
def test_mixed_batch_rows_equal_rows_run_alone(plan):
    torch.manual_seed(0)
    net = MultiTaskNet("resnet10t", {"a": 3, "b": 7, "c": 5}, plan).eval()
    for seg in net.segments:  # make every variant different
        for module in seg.variants.values():
            for p in module.parameters():
                p.data.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(7, 3, 32, 32)
    ids = [2, 0, 1, 1, 0, 2, 1]
    with torch.no_grad():
        mixed = net(x, torch.tensor(ids))
        for row, tid in enumerate(ids):
            task = net.task_names[tid]
            alone = net.forward_task(x[row : row + 1], task)[0]
            width = net.num_classes[task]
            torch.testing.assert_close(mixed[row, :width], alone, atol=1e-5, rtol=1e-5)
            assert torch.isinf(mixed[row, width:]).all()
        # different tasks really give different answers (the variants are used)
        assert not torch.allclose(net.forward_task(x[:1], "a")[0, :3], net.forward_task(x[:1], "b")[0, :3])


def test_unknown_and_unsupported_backbones_name_what_is_supported():
    with pytest.raises(BackboneError, match="supported families"):
        create_backbone("no_such_model", num_classes=3)
    with pytest.raises(BackboneError, match="not supported"):
        create_backbone("vit_tiny_patch16_224", num_classes=3)


def test_accounting_matches_counted_parameters():
    net = MultiTaskNet("resnet10t", {"a": 3, "b": 4}, "bottom:2")
    acc = net.accounting()
    counted = sum(p.numel() for p in net.parameters())
    assert acc.total_params == counted
    stem_and_heads = sum(p.numel() for s in (net.segments[0], net.segments[-1]) for p in s.parameters())
    assert acc.task_specific_params == stem_and_heads
    assert acc.proportion == pytest.approx(stem_and_heads / counted)
    alone = [MultiTaskNet("resnet10t", {"a": n}, "shared").accounting().total_params for n in (3, 4)]
    assert acc.bytes_independent == 4 * sum(alone)
    assert acc.bytes_held == 4 * counted


def test_closest_cut_matches_target_proportion():
    net = MultiTaskNet("resnet18", {"a": 10, "b": 10, "c": 10}, "shared")
    names = [u.name for u in net.units]
    plans = {}
    for target in (0.05, 0.25):
        plan, acc = closest_cut("bottom", net.task_names, names, net.unit_params(), net.head_params(), target)
        others = [
            abs(
                account(
                    parse_plan(f"bottom:{k}", net.task_names, names), net.unit_params(), net.head_params()
                ).proportion
                - target
            )
            for k in range(1, len(names))
        ]
        assert abs(acc.proportion - target) == pytest.approx(min(others))
        plans[target] = plan
    assert int(plans[0.05].split(":")[1]) < int(plans[0.25].split(":")[1])
