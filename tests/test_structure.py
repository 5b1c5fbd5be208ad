"""How the package is put together: no import cycles, every command registered by init_app, no
top-level module installed beside the package, one fail-closed policy, a cron wrapper that warns."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from datetime import timedelta
from pathlib import Path

import pytest

from billing import create_app
from billing.checks.validation import contract_gate
from billing.models import utcnow
from billing.usage.service import flush_pass
from tests.factories import add_accounts, add_events
from tests.process import ROOT

PACKAGE = ROOT / "billing"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(path: Path, module: str) -> set[str]:
    """Every billing module that `path` imports, at import time or inside a function (only the
    `if TYPE_CHECKING:` blocks are left out: they never run).

    `from pkg import sub` counts as importing the submodule; a package's own ancestors are
    imported before it anyway, so an edge to one is no cycle."""
    found: set[str] = set()
    pending: list[ast.AST] = [ast.parse(path.read_text())]
    while pending:
        node = pending.pop()
        if _is_type_checking(node):
            pending.extend(node.orelse)  # type: ignore[attr-defined]
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{alias.name}" for alias in node.names} & MODULES.keys()
            names = subs or {node.module}
            if len(subs) < len(node.names):
                names.add(node.module)
            found |= names
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        pending.extend(ast.iter_child_nodes(node))
    return {
        name
        for name in found
        if name in MODULES and name != module and not module.startswith(name + ".")
    }


GRAPH = {name: _imports(path, name) for name, path in MODULES.items()}


def _layers() -> dict[str, int]:
    """The layers table of billing/__init__.py's docstring: module prefix -> rank (0 lowest)."""
    import billing

    table = billing.__doc__.split("Layers, lowest first.", 1)[1].split("\n\n", 2)[1]
    ranks: dict[str, int] = {}
    rank = -1
    for line in table.strip().splitlines():
        if ":" in line:  # a new layer; a line without one continues the layer above
            rank, line = rank + 1, line.split(":", 1)[1]
        for prefix in line.split():
            ranks[f"billing.{prefix}"] = rank
    return ranks


def _layer_of(module: str, ranks: dict[str, int]) -> int | None:
    matches = [p for p in ranks if module == p or module.startswith(p + ".")]
    return ranks[max(matches, key=len)] if matches else None


def test_the_import_graph_counts_function_level_imports():
    # The one lazy import of the package root, seen: a test of the counting itself.
    assert "billing.app" in GRAPH["billing"]
    assert "billing.config" in GRAPH["billing.gunicorn_conf"]


def test_the_package_and_the_emulator_have_no_import_cycle():
    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        seen: set[str] = set()
        while stack:
            node, path = stack.pop()
            for nxt in GRAPH[node]:
                if nxt == start:
                    return [*path, start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
        return None

    cycles = [cycle for name in sorted(GRAPH) if (cycle := cycle_from(name))]
    assert not cycles, " -> ".join(cycles[0])


def test_every_module_has_a_layer_and_imports_no_higher_layer():
    ranks = _layers()
    emulator = "billing.emulator"
    unplaced, upward, emulator_edges = [], [], []
    for module, imported in GRAPH.items():
        if module == "billing":
            continue  # the package root re-exports the top, lazily
        for target in imported:
            if (module == emulator or module.startswith(emulator + ".")) != (
                target == emulator or target.startswith(emulator + ".")
            ):
                emulator_edges.append(f"{module} -> {target}")
        if module.startswith(emulator):
            continue
        rank = _layer_of(module, ranks)
        if rank is None:
            unplaced.append(module)
            continue
        upward += [
            f"{module} -> {target}"
            for target in imported
            if not target.startswith(emulator) and (_layer_of(target, ranks) or 0) > rank
        ]
    assert not unplaced, f"modules missing from billing/__init__.py's layers table: {unplaced}"
    assert not upward, f"imports that point up a layer: {sorted(upward)}"
    assert not emulator_edges, f"the emulator must stand apart: {sorted(emulator_edges)}"


def test_init_app_registers_every_command_group(settings):
    result = create_app(settings).test_cli_runner().invoke(args=["billing", "--help"])
    assert result.exit_code == 0
    for command in (
        "flush_now", "flush_hourly", "enqueue_hourly", "config", "db",
        "validate_contract", "preflight", "smoke_org", "sync_periods",
        "submissions", "usage", "entitlements", "webhooks", "adjustments", "status", "lock",
        "reconcile", "seed_demo",
    ):  # fmt: skip
        assert f"  {command} " in result.output or f"  {command}\n" in result.output, command


def test_the_wheel_installs_no_top_level_module_beside_the_package(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("billing-*.whl")
    tops = {name.split("/", 1)[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {top for top in tops if not top.startswith("billing")} == set(), tops
    assert "celeryconfig.py" not in tops


@pytest.fixture
def failing_contract(billing_runtime):
    """Pending usage of an event type no meter maps: `event_type_has_meter` fails."""
    add_accounts(billing_runtime, [1])
    add_events(
        billing_runtime,
        [{"organization_id": 1, "event_type": "mystery", "quantity": 1,
          "occurred_at": utcnow() - timedelta(hours=1)}],
    )  # fmt: skip
    return billing_runtime


@pytest.mark.parametrize("fail_closed", [True, False])
def test_one_fail_closed_policy_for_the_gate_and_the_command(failing_contract, fail_closed):
    runtime = failing_contract
    runtime.settings = runtime.settings.replace(
        validate_contract_before_flush=True, contract_fail_closed=fail_closed
    )
    verdict = contract_gate(runtime)()
    assert "event_type_has_meter" in {f["check"] for f in verdict.failures}
    assert verdict.blocks is fail_closed
    assert flush_pass(runtime).blocked is fail_closed
    cli = create_app(runtime.settings).test_cli_runner()
    assert cli.invoke(args=["billing", "validate_contract"]).exit_code == (1 if fail_closed else 0)
    # The flag asks for the same policy when the setting does not.
    assert cli.invoke(args=["billing", "validate_contract", "--fail-closed"]).exit_code == 1


def test_no_gate_when_checks_before_flush_are_off(failing_contract):
    runtime = failing_contract
    runtime.settings = runtime.settings.replace(
        validate_contract_before_flush=False, contract_fail_closed=True
    )
    assert contract_gate(runtime) is None
    assert not flush_pass(runtime).blocked


def test_cron_wrapper_with_no_environment_warns_that_billing_is_disabled():
    result = subprocess.run(
        [str(ROOT / "scripts" / "run_billing_hourly.sh")],
        env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "warning: billing disabled (STRIPE_BILLING_ENABLED is not 1)" in result.stderr
