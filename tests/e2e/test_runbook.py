"""Every `flask billing …` command in ops/RUNBOOK.md exists, and every flag it shows is the
command's own: each is resolved in the CLI and its `--help` run."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from billing import create_app
from billing.config import Settings

# The group with every command module added (an app registers them), whichever test ran first.
billing_cli = create_app(Settings()).cli.commands["billing"]

RUNBOOK = Path(__file__).resolve().parents[2] / "ops" / "RUNBOOK.md"


def runbook_commands() -> list[str]:
    text = RUNBOOK.read_text()
    found = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("flask billing "):  # code blocks
            found.append(stripped)
        # inline code, in prose and in the alert table
        found += re.findall(r"`([^`]*flask billing [^`]*)`", line)
    commands = []
    for command in found:
        command = command[command.index("flask billing ") :]
        if command.split()[2:] in ([], ["…"]):  # "flask billing …": the CLI in general
            continue
        if command not in commands:
            commands.append(command)
    return commands


COMMANDS = runbook_commands()


def resolve(command: str) -> tuple[list[str], click.Command, list[str]]:
    """(subcommand path, the command, the flags the line uses)."""
    words = command.split()[2:]
    path: list[str] = []
    current: click.Command = billing_cli
    for word in words:
        if isinstance(current, click.Group) and word in current.commands:
            current = current.commands[word]
            path.append(word)
        else:
            break
    flags = [w.split("=")[0] for w in words if w.startswith("--")]
    return path, current, flags


def test_the_runbook_shows_the_commands_an_operator_needs():
    paths = {" ".join(resolve(c)[0]) for c in COMMANDS}
    for needed in (
        "db upgrade",
        "preflight",
        "smoke_org",
        "status",
        "reconcile",
        "lock release",
        "lock show",
        "webhooks list",
        "webhooks replay",
        "submissions list",
        "submissions retry",
        "flush_hourly",
        "validate_contract",
    ):
        assert needed in paths, f"the runbook never shows `flask billing {needed}`"


@pytest.mark.parametrize("command", COMMANDS)
def test_runbook_command_exists_and_its_flags_are_the_clis(command, settings):
    path, resolved, flags = resolve(command)
    assert path and not isinstance(resolved, click.Group), f"{command!r}: no such command"
    result = create_app(settings).test_cli_runner().invoke(args=["billing", *path, "--help"])
    assert result.exit_code == 0, result.output
    known = {opt for param in resolved.params for opt in param.opts + param.secondary_opts}
    unknown = [flag for flag in flags if flag not in known]
    assert not unknown, f"{command!r}: {unknown} not options of `flask billing {' '.join(path)}`"
