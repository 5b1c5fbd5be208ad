"""ops/: the systemd units verify, the environment template matches the Settings, and the alert
rules load and fire as intended (promtool)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from billing.config import Settings

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "ops"
INSTALL_ROOT = "/opt/billing"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (scripts/system_packages.sh installs it)")
    return path


class RecordingEnviron(dict):
    """An empty environment that notes every variable Settings asks for."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def get(self, key, default=None):
        self.names.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.names.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.names.add(key)
        return super().__contains__(key)


def template_lines() -> list[tuple[str, str, bool]]:
    """(name, value, commented_out) for each assignment in the environment template."""
    found = []
    for line in (OPS / "billing.env.example").read_text().splitlines():
        match = re.fullmatch(r"(#?)([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if match:
            found.append((match.group(2), match.group(3), bool(match.group(1))))
    return found


def test_env_template_lists_every_variable_settings_read():
    environ = RecordingEnviron()
    Settings.from_env(environ)
    listed = [name for name, _, _ in template_lines()]
    assert len(listed) == len(set(listed)), "a variable is listed twice"
    assert set(listed) == environ.names


def test_env_template_values_are_the_defaults():
    # Loading the template as written changes nothing: each shown value is the default.
    assigned = {name: value for name, value, commented in template_lines() if not commented}
    assert Settings.from_env(assigned) == Settings.from_env({})


def test_env_template_documents_each_variable():
    lines = (OPS / "billing.env.example").read_text().splitlines()
    for index, line in enumerate(lines):
        if re.fullmatch(r"#?[A-Z][A-Z0-9_]*=.*", line) and index > 0:
            previous = lines[index - 1]
            assert previous.startswith("#"), f"no comment explains {line!r}"


def rendered_units(tmp_path: Path) -> list[Path]:
    """The units with the install root pointed at this checkout, whose .venv has the binaries."""
    venv_root = Path(sys.executable).parent.parent.parent
    units = []
    for unit in sorted((OPS / "systemd").glob("*.service")):
        target = tmp_path / unit.name
        target.write_text(unit.read_text().replace(INSTALL_ROOT, str(venv_root)))
        units.append(target)
    return units


def test_systemd_units_verify(tmp_path):
    analyze = need("systemd-analyze")
    units = rendered_units(tmp_path)
    assert {u.name for u in units} == {
        "billing-worker.service",
        "billing-beat.service",
        "billing-flower.service",
        "billing-web.service",
    }
    result = subprocess.run(
        [analyze, "verify", "--man=no", *map(str, units)], capture_output=True, text=True
    )
    # verify exits 0 on unknown keys, only warning: any output counts as a failure here.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )


def test_systemd_verify_catches_a_missing_binary(tmp_path):
    analyze = need("systemd-analyze")
    broken = tmp_path / "billing-worker.service"
    broken.write_text((OPS / "systemd" / "billing-worker.service").read_text())
    result = subprocess.run([analyze, "verify", str(broken)], capture_output=True, text=True)
    assert result.returncode != 0 and "not executable" in result.stderr


def test_alert_rules_check():
    promtool = need("promtool")
    result = subprocess.run(
        [promtool, "check", "rules", str(OPS / "prometheus" / "alerts.yml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Every rule of the file loaded (each helper appends its own; the count follows the file).
    rules = (OPS / "prometheus" / "alerts.yml").read_text().count("- alert: ")
    assert rules >= 14 and f"SUCCESS: {rules} rules found" in result.stdout


def test_alert_rules_fire_as_intended():
    """promtool evaluates the no-flush rule (quiet at 1 h, firing at 2 h 10 m) and others."""
    promtool = need("promtool")
    result = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"],
        cwd=OPS / "prometheus",
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_cron_lines_are_the_alternative_to_beat():
    entries = [
        line.split()
        for line in (OPS / "billing-hourly.cron").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    flush = [e for e in entries if any(w.endswith("scripts/run_billing_hourly.sh") for w in e)]
    assert len(flush) == 1 and flush[0][:5] == ["13", "*", "*", "*", "*"]
    assert (ROOT / "scripts" / "run_billing_hourly.sh").stat().st_mode & 0o111
