"""`RoutingState`'s verbs are the only code that touches the routed layers' per-step state (issue 37): decisions
imposed on a batch and cut to its remaining rows, a request's running sums put on the layers and taken back. An
AST check keeps every module outside `layerroute/nn/` from assigning that state itself."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

from layerroute.nn.kv_cache import RoutedCache
from layerroute.nn.routed import find_routed_layers, gate_records, routing
from layerroute.nn.state import Decisions
from tests.helpers import lively, random_batch, tiny_routed

ROOT = Path(__file__).resolve().parents[1]


def _layer_state_attributes() -> set[str]:
    """What RoutedLayer.__init__ sets on itself besides its constructor arguments: the per-layer state."""
    tree = ast.parse((ROOT / "layerroute" / "nn" / "routed.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "RoutedLayer")
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    args = {a.arg for a in init.args.args}
    names = set()
    for node in ast.walk(init):
        for target in getattr(node, "targets", []) + [getattr(node, "target", None)]:
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                names.add(target.attr)
    return names - args


def _assignments(tree: ast.AST, names: set[str]) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        flat = []
        for t in targets:
            flat.extend(t.elts if isinstance(t, ast.Tuple | ast.List) else [t])
        if any(isinstance(t, ast.Attribute) and t.attr in names for t in flat):
            lines.append(node.lineno)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
                and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and node.args[1].value in names):
            lines.append(node.lineno)
    return lines


def test_only_nn_assigns_a_routed_layers_state():
    names = _layer_state_attributes()
    assert {"decision", "plan", "pool_sum", "pool_count", "record", "bridge"} <= names
    found = []
    for path in sorted((ROOT / "layerroute").rglob("*.py")):
        if path.relative_to(ROOT / "layerroute").parts[0] == "nn":
            continue
        found += [f"{path.relative_to(ROOT)}:{line}" for line in _assignments(ast.parse(path.read_text()), names)]
    assert not found, f"routed-layer state assigned outside layerroute/nn/ (use RoutingState's verbs): {found}"


def test_the_check_sees_an_assignment():
    tree = ast.parse("layer.decision, layer.plan = d, p\nx.pool_sum = None\nsetattr(y, 'record', 1)\nz.other = 2\n")
    assert _assignments(tree, {"decision", "plan", "pool_sum", "record"}) == [1, 2, 3]


def test_imposed_decisions_are_the_ones_taken_and_take_rows_keeps_rows():
    rm = lively(tiny_routed("shape:tiny-qwen2", lora=False))
    ids, mask = random_batch(batch=3, length=10, context=10)
    forced = torch.tensor([[True, False, True, True], [True, True, False, True], [False, True, True, True]])
    cache = RoutedCache()
    with torch.no_grad(), routing(rm.model, "skip", forced=forced) as state:
        rm.model(input_ids=ids, past_key_values=cache, use_cache=True)
        taken = state.decisions()
        assert [g.tolist() for g in taken.gates] == forced.T.float().tolist()
        assert taken.plans[0] != "all" and taken.plans[3] == "all"
        state.take_rows(torch.tensor([0, 2]))
        assert [g.tolist() for g in state.decisions().gates] == forced[[0, 2]].T.float().tolist()
    kept = taken.take_rows(torch.tensor([1])).concat(taken.take_rows(torch.tensor([0])))
    assert [g.tolist() for g in kept.gates] == forced[[1, 0]].T.float().tolist()
    # imposed on a fresh step, the decode forward applies them (no new decision): the records stay unset
    with torch.no_grad(), routing(rm.model, "skip") as state:
        state.impose(kept)
        assert [g.tolist() for g in state.decisions().gates] == forced[[1, 0]].T.float().tolist()


def test_request_sums_puts_them_on_and_takes_them_back():
    rm = tiny_routed("shape:tiny-qwen2", lora=False)
    ids, _ = random_batch(batch=1, length=6, context=6)
    with torch.no_grad(), routing(rm.model, "skip", session_pooling=True) as state:
        with state.request_sums(None) as first:
            rm.model(input_ids=ids, past_key_values=RoutedCache(), use_cache=True)
        assert all(s is None for s in state.sums())  # the layers are left empty for the next request
        sums = first.sums
        assert all(s is not None and float(s[1]) == 6 for s in sums)
        state.new_step()
        with state.request_sums(sums) as second:
            assert state.sums() == sums
            rm.model(input_ids=ids[:, :2], past_key_values=RoutedCache(), use_cache=True)
        assert all(float(s[1]) == 8 for s in second.sums)  # the request's sums grew by its two tokens
    assert len(gate_records(rm.model)) == len(find_routed_layers(rm.model))


def test_decisions_plan_once():
    d = Decisions([torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0])])
    plans = d.plans
    assert plans[1] == "all" and plans[2] == "none" and [t.tolist() for t in plans[0]] == [[0], [1]]
    assert d.plans is plans
