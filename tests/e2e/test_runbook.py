"""Every `flask billing …` command the documentation shows exists, and every flag it shows is the
command's own: ops/RUNBOOK.md, README.md and every docs/*.md page, in their fenced code blocks
and inline code (tables included); each command is resolved in the CLI and its `--help` run.
Every relative link in those pages points at a file (and heading) that exists."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from billing import create_app
from billing.config import Settings

# The group with every command module added (an app registers them), whichever test ran first.
billing_cli = create_app(Settings()).cli.commands["billing"]

ROOT = Path(__file__).resolve().parents[2]
RUNBOOK = ROOT / "ops" / "RUNBOOK.md"
PAGES = [RUNBOOK, ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCED = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"`([^`]+)`")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
PREFIX = "flask billing "

# The operations guide's commands and flags, verbatim: the public interface the docs must show.
OPS_GUIDE_COMMANDS = (
    "flask billing flush_now",
    "flask billing flush_hourly",
    "flask billing enqueue_hourly",
    "flask billing validate_contract --lookback-days 30 --require-zeitgeist --fail-closed",
    "flask billing preflight --require-enabled --fail-closed",
    "flask billing smoke_org --org-id 123 --require-enabled --validate-contract --fail-closed",
    "flask billing smoke_org --skip-contract --no-fail-closed --refresh-period",
)


def shown_commands(text: str) -> list[str]:
    """The `flask billing …` commands of a Markdown page: each line of a fenced block that runs
    one, and each inline code span that holds one (a span may wrap onto the next line)."""
    found = []
    for block in FENCED.findall(text):
        for line in block.splitlines():
            if PREFIX in line:
                found.append(re.sub(r"\s+#.*$", "", line))
    prose = FENCED.sub("", text).replace("\\|", "|")  # `\|` escapes a pipe inside a table
    found += [span for span in INLINE.findall(prose) if PREFIX in span]
    commands = []
    for command in found:
        command = " ".join(command[command.index(PREFIX) :].split())
        if command.split()[2:] in ([], ["…"], ["--help"]):  # the CLI in general
            continue
        commands.extend(expand(command))
    return commands


def expand(command: str) -> list[str]:
    """`flask billing entitlements grant|revoke` names two commands: one line for each."""
    words = command.split()
    current: click.Command = billing_cli
    for index, word in enumerate(words[2:], start=2):
        if not isinstance(current, click.Group):
            break
        if word not in current.commands and "|" in word:
            return [
                alternative
                for name in word.split("|")
                for alternative in expand(" ".join([*words[:index], name, *words[index + 1 :]]))
            ]
        if word not in current.commands:
            break
        current = current.commands[word]
    return [command]


def documented_commands() -> list[tuple[str, str]]:
    """(page, command) for every command shown, each once (on the first page that shows it)."""
    seen: dict[str, str] = {}
    for page in PAGES:
        for command in shown_commands(page.read_text()):
            seen.setdefault(command, str(page.relative_to(ROOT)))
    return [(page, command) for command, page in seen.items()]


DOCUMENTED = documented_commands()


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
    return path, current, FLAG.findall(" ".join(words[len(path) :]))


def leaf_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> set[str]:
    paths: set[str] = set()
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            paths |= leaf_paths(command, (*prefix, name))
        else:
            paths.add(" ".join((*prefix, name)))
    return paths


def test_every_page_is_read_and_the_cli_page_shows_every_command():
    pages = {page for page, _ in DOCUMENTED}
    assert {"ops/RUNBOOK.md", "README.md", "docs/cli.md", "docs/flush.md"} <= pages
    cli_page = {" ".join(resolve(c)[0]) for c in shown_commands((ROOT / "docs/cli.md").read_text())}
    missing = leaf_paths(billing_cli) - cli_page
    assert not missing, f"docs/cli.md does not show {sorted(missing)}"


def test_the_runbook_shows_the_commands_an_operator_needs():
    paths = {" ".join(resolve(c)[0]) for c in shown_commands(RUNBOOK.read_text())}
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


@pytest.mark.parametrize("command", OPS_GUIDE_COMMANDS)
def test_the_docs_show_the_operations_guides_commands_and_flags(command):
    path, _, flags = resolve(command)
    shown = [resolve(c) for _, c in DOCUMENTED]
    assert any(p == path and set(flags) <= set(f) for p, _, f in shown), (
        f"no page shows `flask billing {' '.join(path)}` with {flags}"
    )


@pytest.mark.parametrize(("page", "command"), DOCUMENTED)
def test_documented_command_exists_and_its_flags_are_the_clis(page, command, settings):
    path, resolved, flags = resolve(command)
    assert path and not isinstance(resolved, click.Group), f"{page}: {command!r}: no such command"
    result = create_app(settings).test_cli_runner().invoke(args=["billing", *path, "--help"])
    assert result.exit_code == 0, result.output
    known = {opt for param in resolved.params for opt in param.opts + param.secondary_opts}
    unknown = [flag for flag in flags if flag not in known]
    assert not unknown, (
        f"{page}: {command!r}: {unknown} not options of `flask billing {' '.join(path)}`"
    )


# A repository path in inline code (`billing/usage/claiming.py`, `ops/systemd/`), not a pattern.
REPO_PATH = re.compile(r"(?:billing|tests|ops|scripts|bench|docs)/[\w./-]*")


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_the_files_a_page_names_exist(page):
    spans = INLINE.findall(FENCED.sub("", page.read_text()))
    named = {span for span in spans if REPO_PATH.fullmatch(span)}
    # What the benchmarks write there is this machine's and not committed (.gitignore).
    named = {
        path for path in named if not path.startswith("bench/results/") or path.endswith(".md")
    }
    missing = sorted(path for path in named if not (ROOT / path).exists())
    assert not missing, f"{page.relative_to(ROOT)} names files that do not exist: {missing}"


LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = FENCED.sub("", page.read_text())
    headings = re.findall(r"^#+ (.+)$", text, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize(
    "page",
    [*PAGES, *sorted((ROOT / "bench" / "results").glob("*.md"))],
    ids=lambda page: str(page.relative_to(ROOT)),
)
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(FENCED.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):  # http(s), mailto
            continue
        file, _, anchor = target.partition("#")
        linked = (page.parent / file).resolve() if file else page
        if not linked.exists() or (
            anchor and linked.suffix == ".md" and anchor not in anchors(linked)
        ):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"
