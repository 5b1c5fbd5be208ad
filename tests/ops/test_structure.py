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
from tests.process import ROOT
from tests.usage.factories import add_accounts, add_events

PACKAGE = ROOT / "billing"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_time_imports(path: Path, module: str, known: set[str]) -> set[str]:
    """billing modules imported when `path` is imported (not inside functions or TYPE_CHECKING).

    `from pkg import sub` counts as importing the submodule; a package's own ancestors are
    imported before it anyway, so an edge to one is no cycle."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{alias.name}" for alias in node.names} & known
            names = subs or {node.module}
            if len(subs) < len(node.names):
                names.add(node.module)
        elif isinstance(node, ast.Import):
            names = {alias.name for alias in node.names}
        else:
            continue
        found |= {name for name in names if name in known and not module.startswith(name + ".")}
    return found


def test_the_package_has_no_import_cycle():
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py") if "migrations" not in p.parts}
    graph = {
        name: _import_time_imports(path, name, set(files)) - {name} for name, path in files.items()
    }

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        seen: set[str] = set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return [*path, start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
        return None

    cycles = [cycle for name in sorted(graph) if (cycle := cycle_from(name))]
    assert not cycles, " -> ".join(cycles[0])


def test_init_app_registers_every_command_group(settings):
    result = create_app(settings).test_cli_runner().invoke(args=["billing", "--help"])
    assert result.exit_code == 0
    for command in (
        "flush_now", "flush_hourly", "enqueue_hourly", "config", "db",
        "validate_contract", "preflight", "smoke_org", "sync_periods",
        "submissions", "entitlements", "webhooks", "adjustments", "status", "lock", "reconcile",
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
