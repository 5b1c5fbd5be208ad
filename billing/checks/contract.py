"""The upstream `billable_events` contract, written down once, and the checks that enforce it.

`CONTRACT_COLUMNS` and `CONTRACT_RULES` are the contract. `run_contract_checks` enforces them (as
`flask billing validate_contract` and as the pre-flush gate) and `contract_markdown()` renders them
for docs/flush.md, so the documentation and the checks cannot drift apart. The upstream way to
correct billed usage, `billable_event_corrections`, has its own (`CORRECTION_COLUMNS`,
`CORRECTION_RULES`, `corrections_markdown()`), checked in the same run.

Every check is one set-based query (a count, then up to five sample ids only when it fails). The
per-row rules look at pending rows only (neither claimed nor dismissed, `models.pending_event`): a
claimed row passed the same rules when the flush claimed it, so the cost follows the backlog
(partial index `ix_billable_events_unclaimed`), not the table's history. No check may fail on the
value it checks (see `billing.billability`): a 1e30 quantity is reported, not an error.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.types import TypeEngine

from billing.checks.billability import (
    EVENTS,
    MAX_EVENT_AGE,
    REQUIRED_COLUMNS,
    exact_sum,
    hour_bucket,
    whole_number,
)
from billing.checks.report import Status, StatusReport, render_table
from billing.config import Settings
from billing.models import (
    BillableEvent,
    BillableEventCorrection,
    BillingAccount,
    pending_correction,
    pending_event,
    utcnow,
)
from billing.runtime import Runtime

TABLE = "billable_events"
ZEITGEIST_SOURCE = "zeitgeist"
# Stripe takes meter events up to 5 minutes ahead; producers' clocks get the same allowance.
FUTURE_SKEW = timedelta(minutes=5)
SAMPLE_LIMIT = 5


# The contract, as data -------------------------------------------------------------------------


@dataclass(frozen=True)
class ContractColumn:
    name: str
    types: tuple[type[TypeEngine[Any]], ...]  # reflected types that are compatible
    sql: str  # the compatible SQL types, as docs/flush.md names them
    nullable: bool  # whether NULL is an allowed value
    owner: str  # "upstream" writes it; "billing" owns it (set when the flush claims the row)
    meaning: str


CONTRACT_COLUMNS: tuple[ContractColumn, ...] = (
    ContractColumn(
        "id",
        (sa.Integer,),
        "bigint, integer",
        False,
        "upstream",
        "Primary key; reports name offending rows by it.",
    ),
    ContractColumn(
        "organization_id",
        (sa.Integer,),
        "bigint, integer",
        False,
        "upstream",
        "The organization billed; needs a billing account with a Stripe customer.",
    ),
    ContractColumn(
        "event_type",
        (sa.String,),
        "varchar, text",
        False,
        "upstream",
        "Mapped to a Stripe meter by `STRIPE_BILLING_METERS`.",
    ),
    ContractColumn(
        "quantity",
        (sa.Integer, sa.Numeric),
        "bigint, integer, numeric",
        False,
        "upstream",
        "Usage amount: a whole number > 0 (the meter event value).",
    ),
    ContractColumn(
        "occurred_at",
        (sa.DateTime,),
        "timestamp with time zone",
        False,
        "upstream",
        "When the usage happened (UTC); decides the billing hour and period.",
    ),
    ContractColumn(
        "source",
        (sa.String,),
        "varchar, text",
        True,
        "upstream",
        f"Producer name; `{ZEITGEIST_SOURCE}` events prove that producer is alive.",
    ),
    ContractColumn(
        "idempotency_key",
        (sa.String,),
        "varchar, text",
        False,
        "upstream",
        "Unique per usage event, so a retried write never bills twice.",
    ),
    ContractColumn(
        "usage_submission_id",
        (sa.Integer,),
        "bigint, integer",
        True,
        "billing",
        "NULL until the flush claims the row.",
    ),
    ContractColumn(
        "claimed_at",
        (sa.DateTime,),
        "timestamp with time zone",
        True,
        "billing",
        "When the flush claimed the row.",
    ),
    ContractColumn(
        "usage_dismissal_id",
        (sa.Integer,),
        "bigint, integer",
        True,
        "billing",
        "NULL unless an operator dismissed the row (`flask billing usage dismiss`); a row is "
        "pending while this and `usage_submission_id` are NULL.",
    ),
)

PENDING_IN_WINDOW = "pending rows that occurred in the lookback window (or have no occurred_at)"


@dataclass(frozen=True)
class ContractRule:
    check: str
    rule: str
    rows: str  # which rows the check reads


CONTRACT_RULES: tuple[ContractRule, ...] = (
    ContractRule(
        "table_columns",
        "`billable_events` and every required column exist with a compatible type "
        "(when this fails, every other check is skipped).",
        "the schema",
    ),
    ContractRule(
        "required_values",
        "organization_id, event_type, quantity and occurred_at are never NULL.",
        PENDING_IN_WINDOW,
    ),
    ContractRule(
        "quantity_positive_integer", "quantity is a whole number greater than 0.", PENDING_IN_WINDOW
    ),
    ContractRule(
        "quantity_within_ceiling",
        "quantity is at most `STRIPE_USAGE_MAX_EVENT_QUANTITY` (default 10^12); a larger one is "
        "set aside (`quantity_over_ceiling`), never sent.",
        PENDING_IN_WINDOW,
    ),
    ContractRule(
        "group_within_ceiling",
        "the valid quantities (whole, > 0, within the event ceiling) of one organization, event "
        "type and hour sum to at most `STRIPE_USAGE_MAX_GROUP_QUANTITY` (default 10^13); a larger "
        "group is set aside (`group_over_ceiling`), never sent.",
        PENDING_IN_WINDOW,
    ),
    ContractRule(
        "occurred_at_not_future",
        f"occurred_at is at most {int(FUTURE_SKEW.total_seconds() // 60)} minutes "
        "ahead of now (clock skew).",
        PENDING_IN_WINDOW,
    ),
    ContractRule(
        "occurred_at_billable_age",
        f"a row is claimed before it is {MAX_EVENT_AGE.days} days old: Stripe refuses "
        "meter events older than 35 days.",
        "pending rows of any age",
    ),
    ContractRule(
        "event_type_has_meter",
        "every event_type maps to a Stripe meter in `STRIPE_BILLING_METERS`.",
        PENDING_IN_WINDOW,
    ),
    ContractRule(
        "idempotency_key_unique",
        "idempotency_key is unique (a unique index or constraint on it passes at once).",
        "rows in the lookback window and pending rows",
    ),
    ContractRule(
        "organization_has_customer",
        "every organization with pending events has a billing account with a Stripe customer.",
        PENDING_IN_WINDOW,
    ),
    ContractRule(
        "zeitgeist_fresh",
        "when required (`--require-zeitgeist`, "
        "`STRIPE_BILLING_CONTRACT_REQUIRE_ZEITGEIST=1`): events from source "
        f"`{ZEITGEIST_SOURCE}` exist in the window and the newest is at most "
        "`STRIPE_BILLING_CONTRACT_ZEITGEIST_MAX_AGE_HOURS` (default 24) old.",
        "rows in the lookback window, all organizations",
    ),
)

# The upstream correction table (`billing.usage.corrections`): a producer retracts (or restates)
# billed usage with plain SQL; the flush takes each pending row in once, or rejects it with the
# reason (`flask billing usage corrections list`).
CORRECTIONS_TABLE = "billable_event_corrections"

CORRECTION_COLUMNS: tuple[ContractColumn, ...] = (
    ContractColumn("id", (sa.Integer,), "bigint, integer", False, "upstream", "Primary key."),
    ContractColumn(
        "organization_id",
        (sa.Integer,),
        "bigint, integer",
        False,
        "upstream",
        "The organization whose billed usage changes; needs a billing account with a Stripe "
        "customer.",
    ),
    ContractColumn(
        "event_type",
        (sa.String,),
        "varchar, text",
        False,
        "upstream",
        "A type of `STRIPE_BILLING_METERS`, on a `sum` meter without an `event_time_window`.",
    ),
    ContractColumn(
        "hour",
        (sa.DateTime,),
        "timestamp with time zone",
        False,
        "upstream",
        "The start of the hour corrected (UTC, minutes and seconds 0), not ahead of now.",
    ),
    ContractColumn(
        "delta",
        (sa.Integer, sa.Numeric),
        "bigint, integer, numeric",
        False,
        "upstream",
        "By how much the hour's billed total changes: a whole number, not 0; negative retracts "
        "(never below what was billed; a positive one only in the current period).",
    ),
    ContractColumn(
        "reason",
        (sa.String, sa.Text),
        "text, varchar",
        False,
        "upstream",
        "Why; kept, and on the invoice line of a credit.",
    ),
    ContractColumn(
        "idempotency_key",
        (sa.String,),
        "varchar, text",
        False,
        "upstream",
        "Unique per correction (a unique constraint): a retried write is one correction.",
    ),
    ContractColumn(
        "source", (sa.String,), "varchar, text", True, "upstream", "Producer name (the actor)."
    ),
    ContractColumn(
        "usage_correction_id",
        (sa.Integer,),
        "bigint, integer",
        True,
        "billing",
        "The `usage_corrections` row the flush made of it.",
    ),
    ContractColumn(
        "rejected_reason",
        (sa.String, sa.Text),
        "text",
        True,
        "billing",
        "Why the flush refused it (the row stays: write a new row with a new key); a row is "
        "pending while this and `usage_correction_id` are NULL.",
    ),
    ContractColumn(
        "taken_at",
        (sa.DateTime,),
        "timestamp with time zone",
        True,
        "billing",
        "When the flush took or rejected it.",
    ),
)

CORRECTION_RULES: tuple[ContractRule, ...] = (
    ContractRule(
        "corrections_table_columns",
        f"`{CORRECTIONS_TABLE}` and every column above exist with a compatible type (when this "
        "fails, `correction_values` is skipped).",
        "the schema",
    ),
    ContractRule(
        "correction_values",
        "delta is a whole number other than 0; hour is the start of an hour and not ahead of "
        "now; event_type has a meter; the organization has a billing account with a Stripe "
        "customer. What only the flush can judge (a retraction above what was billed, a "
        "positive correction of an invoiced period, a meter that does not sum) is refused when "
        "it takes the row: `rejected_reason`, listed by `flask billing usage corrections list`.",
        "pending correction rows, of any age",
    ),
)

CHECK_NAMES: tuple[str, ...] = tuple(rule.check for rule in CONTRACT_RULES + CORRECTION_RULES)


def contract_markdown() -> str:
    """The contract as Markdown tables, for docs/flush.md."""
    return _contract_tables(CONTRACT_COLUMNS, CONTRACT_RULES)


def corrections_markdown() -> str:
    """The upstream correction table's contract as Markdown tables, for docs/flush.md."""
    return _contract_tables(CORRECTION_COLUMNS, CORRECTION_RULES)


def _contract_tables(
    contract_columns: Sequence[ContractColumn], contract_rules: Sequence[ContractRule]
) -> str:
    columns = [
        (f"`{c.name}`", c.sql, "yes" if c.nullable else "no", c.owner, c.meaning)
        for c in contract_columns
    ]
    rules = [(f"`{r.check}`", r.rule, r.rows) for r in contract_rules]
    return (
        _markdown_table(
            ("column", "compatible types", "NULL allowed", "written by", "meaning"), columns
        )
        + "\n\n"
        + _markdown_table(("check", "rule", "rows checked"), rules)
        + "\n"
    )


def _markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# Results ---------------------------------------------------------------------------------------


@dataclass
class CheckResult:
    check: str
    status: Status
    offending_rows: int | None = None  # None: not a row count (schema, producer liveness)
    sample_ids: list[int] = field(default_factory=list)
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status.value}


@dataclass
class ContractReport(StatusReport):
    checks: list[CheckResult]
    lookback_days: int
    window_start: datetime
    now: datetime
    organization_id: int | None
    require_zeitgeist: bool
    duration_seconds: float = 0.0

    def entries(self) -> list[CheckResult]:
        return self.checks

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "lookback_days": self.lookback_days,
            "window_start": self.window_start.isoformat(),
            "now": self.now.isoformat(),
            "organization_id": self.organization_id,
            "require_zeitgeist": self.require_zeitgeist,
            "duration_seconds": self.duration_seconds,
            "checks": [c.to_dict() for c in self.checks],
        }

    def table(self) -> str:
        rows = [
            (
                c.check,
                c.status.value,
                "-" if c.offending_rows is None else c.offending_rows,
                ",".join(map(str, c.sample_ids)) or "-",
                c.detail,
            )
            for c in self.checks
        ]
        return render_table(("check", "status", "offending rows", "sample ids", "detail"), rows)


# The checks ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scope:
    now: datetime
    since: datetime
    organization_id: int | None
    meters: tuple[str, ...]
    quantity_is_integer: bool
    dialect: str
    max_event_quantity: int
    max_group_quantity: int


@dataclass(frozen=True)
class RowCheck:
    """A per-row rule over pending rows: `predicate` picks the offending ones."""

    check: str
    predicate: Callable[[Scope], sa.ColumnElement[bool]]
    problem: str  # "<count> <problem>"
    subject: Any = None  # a column whose distinct offending values the detail names
    in_window: bool = True


# Short names for the query builders below.
event = BillableEvent
account = BillingAccount


def _in_window(scope: Scope) -> sa.ColumnElement[bool]:
    return sa.or_(event.occurred_at >= scope.since, event.occurred_at.is_(None))


def _whole_positive(scope: Scope, quantity: Any) -> sa.ColumnElement[bool]:
    if scope.quantity_is_integer:
        return quantity > 0
    # A numeric column can hold fractions: the flush's own rule leaves those unclaimed. Never a
    # cast to bigint: 1e30 would make the check itself fail (see `billing.billability`).
    return sa.and_(quantity > 0, whole_number(quantity, scope.dialect))


def _not_whole_positive(scope: Scope) -> sa.ColumnElement[bool]:
    return sa.and_(event.quantity.is_not(None), sa.not_(_whole_positive(scope, event.quantity)))


def _valid_quantity(scope: Scope, quantity: Any) -> sa.ColumnElement[bool]:
    """What the flush sums: a whole number > 0 within the event ceiling."""
    return sa.and_(_whole_positive(scope, quantity), quantity <= scope.max_event_quantity)


def _in_group_over_ceiling(scope: Scope) -> sa.ColumnElement[bool]:
    """A valid row of an (organization, event type, hour) whose valid pending rows in the window
    sum above the group ceiling."""
    inner = EVENTS.alias("group_rows")
    c = inner.c
    group = (c.organization_id, c.event_type, hour_bucket(c.occurred_at, scope.dialect))
    conditions = [
        pending_event(inner),
        c.occurred_at >= scope.since,
        _valid_quantity(scope, c.quantity),
    ]
    if scope.organization_id is not None:
        conditions.append(c.organization_id == scope.organization_id)
    over = (
        sa.select(*group)
        .where(*conditions)
        .group_by(*group)
        .having(exact_sum(c.quantity, scope.dialect) > scope.max_group_quantity)
    )
    row = (event.organization_id, event.event_type, hour_bucket(event.occurred_at, scope.dialect))
    return sa.and_(_valid_quantity(scope, event.quantity), sa.tuple_(*row).in_(over))


def _unmapped_event_type(scope: Scope) -> sa.ColumnElement[bool]:
    if not scope.meters:
        return event.event_type.is_not(None)
    return sa.and_(event.event_type.is_not(None), event.event_type.not_in(scope.meters))


REQUIRED_VALUE_COLUMNS = REQUIRED_COLUMNS  # the flush's `missing_value`

ROW_CHECKS: tuple[RowCheck, ...] = (
    RowCheck(
        "required_values",
        lambda s: sa.or_(*(getattr(event, c).is_(None) for c in REQUIRED_VALUE_COLUMNS)),
        "pending row(s) with NULL in a required column",
    ),
    RowCheck(
        "quantity_positive_integer",
        _not_whole_positive,
        "pending row(s) whose quantity is not a whole number > 0",
    ),
    RowCheck(
        "quantity_within_ceiling",
        lambda s: event.quantity > s.max_event_quantity,
        "pending row(s) whose quantity is above STRIPE_USAGE_MAX_EVENT_QUANTITY",
    ),
    RowCheck(
        "group_within_ceiling",
        _in_group_over_ceiling,
        "pending row(s) in an organization, event type and hour whose quantities sum above "
        "STRIPE_USAGE_MAX_GROUP_QUANTITY",
        subject=event.organization_id,
    ),
    RowCheck(
        "occurred_at_not_future",
        lambda s: event.occurred_at > s.now + FUTURE_SKEW,
        f"pending row(s) more than {int(FUTURE_SKEW.total_seconds() // 60)} minutes in the future",
    ),
    RowCheck(
        "occurred_at_billable_age",
        lambda s: event.occurred_at <= s.now - MAX_EVENT_AGE,
        f"pending row(s) older than {MAX_EVENT_AGE.days} days: Stripe will refuse them, "
        "bill or write them off by hand",
        in_window=False,
    ),
    RowCheck(
        "event_type_has_meter",
        _unmapped_event_type,
        "pending row(s) whose event_type has no meter in STRIPE_BILLING_METERS",
        subject=event.event_type,
    ),
    RowCheck(
        "organization_has_customer",
        lambda s: sa.and_(event.organization_id.is_not(None), account.stripe_customer_id.is_(None)),
        "pending row(s) of organizations without a billing account with a Stripe customer",
        subject=event.organization_id,
    ),
)


def run_contract_checks(
    runtime: Runtime,
    *,
    lookback_days: int | None = None,
    require_zeitgeist: bool | None = None,
    organization_id: int | None = None,
    now: datetime | None = None,
) -> ContractReport:
    """Check `billable_events` against the contract over the lookback window; what is not given
    comes from the settings (STRIPE_BILLING_CONTRACT_LOOKBACK_DAYS, …_REQUIRE_ZEITGEIST), here
    only."""
    settings = runtime.settings
    if lookback_days is None:
        lookback_days = settings.contract_lookback_days
    if lookback_days < 1:
        raise ValueError(f"lookback_days must be >= 1, got {lookback_days}")
    if require_zeitgeist is None:
        require_zeitgeist = settings.contract_require_zeitgeist
    now = now or utcnow()
    report = ContractReport(
        checks=[],
        lookback_days=lookback_days,
        window_start=now - timedelta(days=lookback_days),
        now=now,
        organization_id=organization_id,
        require_zeitgeist=require_zeitgeist,
    )
    started = time.monotonic()
    with runtime.engine.connect() as connection:
        results = _check_all(connection, report, settings)
    report.checks = [results[name] for name in CHECK_NAMES]
    report.duration_seconds = round(time.monotonic() - started, 3)
    return report


def _check_all(
    connection: Connection, report: ContractReport, settings: Settings
) -> dict[str, CheckResult]:
    inspector = sa.inspect(connection)
    schema = _schema_check(inspector, TABLE, CONTRACT_COLUMNS, "table_columns")
    if schema.status is Status.FAIL:
        skipped = {
            name: CheckResult(name, Status.SKIP, detail="skipped: table_columns failed")
            for name in CHECK_NAMES
        }
        return {**skipped, schema.check: schema}
    scope = Scope(
        now=report.now,
        since=report.window_start,
        organization_id=report.organization_id,
        meters=tuple(sorted(settings.stripe_meters)),
        quantity_is_integer=_column_is_integer(inspector, "quantity"),
        dialect=connection.dialect.name,
        max_event_quantity=settings.max_event_quantity,
        max_group_quantity=settings.max_group_quantity,
    )
    results = {r.check: r for r in _row_checks(connection, scope)}
    results[schema.check] = schema
    results["idempotency_key_unique"] = _idempotency_check(connection, inspector, scope)
    results.update(_correction_checks(connection, inspector, scope))
    results["zeitgeist_fresh"] = (
        _zeitgeist_check(connection, scope, settings.contract_zeitgeist_max_age_hours)
        if report.require_zeitgeist
        else CheckResult(
            "zeitgeist_fresh", Status.SKIP, detail="not required (--require-zeitgeist to enforce)"
        )
    )
    return results


# table_columns


def _schema_check(
    inspector: sa.Inspector, table: str, columns: Sequence[ContractColumn], name: str
) -> CheckResult:
    if not inspector.has_table(table):
        return CheckResult(name, Status.FAIL, detail=f"table {table} does not exist")
    reflected = {c["name"]: c["type"] for c in inspector.get_columns(table)}
    dialect = inspector.dialect.name
    problems = [
        problem
        for column in columns
        if (problem := _column_problem(column, reflected.get(column.name), dialect))
    ]
    if problems:
        return CheckResult(name, Status.FAIL, detail="; ".join(problems))
    return CheckResult(name, Status.PASS, detail=f"{len(columns)} required columns present")


def upstream_column_problems(inspector: sa.Inspector) -> list[str]:
    """What keeps an existing table from meeting the contract's upstream columns."""
    reflected = {c["name"]: c["type"] for c in inspector.get_columns(TABLE)}
    dialect = inspector.dialect.name
    return [
        problem
        for column in CONTRACT_COLUMNS
        if column.owner == "upstream"
        and (problem := _column_problem(column, reflected.get(column.name), dialect))
    ]


def _column_problem(column: ContractColumn, found: Any, dialect: str) -> str | None:
    if found is None:
        return f"missing column {column.name} ({column.sql})"
    if not isinstance(found, column.types):
        return f"{column.name} is {found}, want {column.sql}"
    # A naive PostgreSQL timestamp shifts by the session time zone: the hour billed would move.
    if dialect == "postgresql" and isinstance(found, sa.DateTime) and not found.timezone:
        return f"{column.name} is timestamp without time zone, want {column.sql}"
    return None


def _column_is_integer(inspector: sa.Inspector, name: str) -> bool:
    types = {c["name"]: c["type"] for c in inspector.get_columns(TABLE)}
    return isinstance(types[name], sa.Integer)


# per-row checks over pending rows


def _pending(scope: Scope) -> list[sa.ColumnElement[bool]]:
    conditions = [pending_event()]
    if scope.organization_id is not None:
        conditions.append(event.organization_id == scope.organization_id)
    return conditions


def _offending(check: RowCheck, scope: Scope) -> sa.ColumnElement[bool]:
    predicate = check.predicate(scope)
    return sa.and_(_in_window(scope), predicate) if check.in_window else predicate


def _pending_rows() -> Any:
    return (
        sa.select()
        .select_from(event)
        .outerjoin(account, account.organization_id == event.organization_id)
    )


def _row_checks(connection: Connection, scope: Scope) -> list[CheckResult]:
    """One pass counts every rule's offenders; samples are fetched for failing rules only."""
    counts = [
        sa.func.count().filter(_offending(check, scope)).label(check.check) for check in ROW_CHECKS
    ]
    nulls = [
        sa.func.count().filter(sa.and_(_in_window(scope), getattr(event, c).is_(None))).label(c)
        for c in REQUIRED_VALUE_COLUMNS
    ]
    in_window = sa.func.count().filter(_in_window(scope)).label("in_window")
    query = _pending_rows().add_columns(in_window, *counts, *nulls).where(*_pending(scope))
    row = connection.execute(query).one()._mapping
    results = []
    for check in ROW_CHECKS:
        offending = int(row[check.check])
        if not offending:
            scanned = "pending rows" if not check.in_window else "pending rows in the window"
            results.append(
                CheckResult(
                    check.check, Status.PASS, 0, detail=f"0 of {row['in_window']} {scanned}"
                )
            )
            continue
        detail = f"{offending} {check.problem}"
        if check.check == "required_values":
            detail += ": " + ", ".join(f"{c} {row[c]}" for c in REQUIRED_VALUE_COLUMNS if row[c])
        elif check.subject is not None:
            values = _distinct_values(connection, check, scope)
            detail += f": {check.subject.key} " + ", ".join(map(str, values))
        results.append(
            CheckResult(
                check.check, Status.FAIL, offending, _sample_ids(connection, check, scope), detail
            )
        )
    return results


def _sample_ids(connection: Connection, check: RowCheck, scope: Scope) -> list[int]:
    # No ORDER BY: LIMIT alone stops the scan at the fifth hit instead of sorting every offender.
    query = (
        _pending_rows()
        .add_columns(event.id)
        .where(*_pending(scope), _offending(check, scope))
        .limit(SAMPLE_LIMIT)
    )
    return sorted(connection.scalars(query))


def _distinct_values(connection: Connection, check: RowCheck, scope: Scope) -> list[Any]:
    query = (
        _pending_rows()
        .add_columns(check.subject)
        .where(*_pending(scope), _offending(check, scope))
        .distinct()
        .limit(SAMPLE_LIMIT)
    )
    return sorted(connection.scalars(query))


# idempotency_key_unique


def unique_index_on(inspector: sa.Inspector, column: str) -> str | None:
    for constraint in inspector.get_unique_constraints(TABLE):
        if constraint["column_names"] == [column]:
            return constraint.get("name") or "unique constraint"
    for index in inspector.get_indexes(TABLE):
        partial = any(key.endswith("_where") for key in index.get("dialect_options", {}))
        if index.get("unique") and index["column_names"] == [column] and not partial:
            return index["name"]
    if inspector.dialect.name == "sqlite":
        return _sqlite_auto_unique_index_on(inspector, column)
    return None


def _sqlite_auto_unique_index_on(inspector: sa.Inspector, column: str) -> str | None:
    """A column-level UNIQUE on SQLite is an automatic index that reflection does not list."""
    for index in _pragma(inspector, f"PRAGMA index_list('{TABLE}')"):
        if not index.unique or index.partial:
            continue
        info = _pragma(inspector, f"PRAGMA index_info('{index.name}')")
        if [row.name for row in info] == [column]:
            return str(index.name)
    return None


def _pragma(inspector: sa.Inspector, sql: str) -> list[Any]:
    bind = inspector.bind
    if isinstance(bind, sa.Engine):
        with bind.connect() as connection:
            return list(connection.exec_driver_sql(sql))
    return list(bind.exec_driver_sql(sql))


def _idempotency_check(
    connection: Connection, inspector: sa.Inspector, scope: Scope
) -> CheckResult:
    enforced = unique_index_on(inspector, "idempotency_key")
    if enforced:
        return CheckResult(
            "idempotency_key_unique",
            Status.PASS,
            0,
            detail=f"enforced by the database ({enforced})",
        )
    rows = [
        sa.or_(event.occurred_at >= scope.since, pending_event()),
        event.idempotency_key.is_not(None),
    ]
    if scope.organization_id is not None:
        rows.append(event.organization_id == scope.organization_id)
    duplicated = (
        sa.select(event.idempotency_key)
        .where(*rows)
        .group_by(event.idempotency_key)
        .having(sa.func.count() > 1)
    )
    offending = [*rows, event.idempotency_key.in_(duplicated)]
    counted = connection.execute(
        sa.select(sa.func.count(), sa.func.count(sa.distinct(event.idempotency_key))).where(
            *offending
        )
    ).one()
    if not counted[0]:
        return CheckResult(
            "idempotency_key_unique",
            Status.PASS,
            0,
            detail="no duplicates (no unique index: checked the window)",
        )
    samples = sorted(connection.scalars(sa.select(event.id).where(*offending).limit(SAMPLE_LIMIT)))
    return CheckResult(
        "idempotency_key_unique",
        Status.FAIL,
        int(counted[0]),
        samples,
        f"{counted[0]} rows share {counted[1]} idempotency key(s); add a unique index",
    )


# zeitgeist_fresh


def _zeitgeist_check(connection: Connection, scope: Scope, max_age_hours: int) -> CheckResult:
    """Producer liveness is global: a quiet organization says nothing about the producer."""
    count, newest = connection.execute(
        sa.select(sa.func.count(), sa.func.max(event.occurred_at)).where(
            event.source == ZEITGEIST_SOURCE,
            event.occurred_at >= scope.since,
            event.occurred_at <= scope.now + FUTURE_SKEW,
        )
    ).one()
    if not count:
        return CheckResult(
            "zeitgeist_fresh",
            Status.FAIL,
            detail=f"no events from source {ZEITGEIST_SOURCE!r} since "
            f"{scope.since:%Y-%m-%d %H:%M} UTC",
        )
    age_hours = max((scope.now - newest).total_seconds() / 3600, 0.0)
    summary = f"{count} {ZEITGEIST_SOURCE} events; newest {age_hours:.1f} h ago"
    if age_hours > max_age_hours:
        return CheckResult(
            "zeitgeist_fresh",
            Status.FAIL,
            detail=f"{summary}, over the {max_age_hours} h limit: is the producer down?",
        )
    return CheckResult("zeitgeist_fresh", Status.PASS, detail=summary)


# the upstream correction table

corrections = BillableEventCorrection.__table__


def _correction_problems(scope: Scope) -> list[tuple[str, sa.ColumnElement[bool]]]:
    """(what is wrong, the pending rows it is wrong for)."""
    c = corrections.c
    if scope.dialect == "postgresql":
        aligned = sa.func.date_trunc("hour", c.hour, "UTC") == c.hour
    else:  # SQLite keeps the UTC text billing wrote
        aligned = sa.func.strftime("%M:%f", c.hour) == "00:00.000"
    mapped = c.event_type.in_(scope.meters) if scope.meters else sa.false()
    return [
        (
            "delta is 0 or not a whole number",
            sa.or_(c.delta == 0, ~whole_number(c.delta, scope.dialect)),
        ),
        ("hour is not the start of an hour", ~aligned),
        ("hour is ahead of now", c.hour > scope.now),
        ("event_type has no meter in STRIPE_BILLING_METERS", ~mapped),
        (
            "organization without a billing account with a Stripe customer",
            account.stripe_customer_id.is_(None),
        ),
    ]


def _correction_checks(
    connection: Connection, inspector: sa.Inspector, scope: Scope
) -> dict[str, CheckResult]:
    schema = _schema_check(
        inspector, CORRECTIONS_TABLE, CORRECTION_COLUMNS, "corrections_table_columns"
    )
    if schema.status is Status.FAIL:
        skipped = CheckResult(
            "correction_values", Status.SKIP, detail="skipped: corrections_table_columns failed"
        )
        return {schema.check: schema, skipped.check: skipped}
    problems = _correction_problems(scope)
    conditions = [pending_correction()]
    if scope.organization_id is not None:
        conditions.append(corrections.c.organization_id == scope.organization_id)
    rows = (
        sa.select()
        .select_from(corrections)
        .outerjoin(account, account.organization_id == corrections.c.organization_id)
        .where(*conditions)
    )
    counts = rows.add_columns(
        sa.func.count().label("pending"),
        *(sa.func.count().filter(wrong).label(f"p{i}") for i, (_, wrong) in enumerate(problems)),
        sa.func.count().filter(sa.or_(*(wrong for _, wrong in problems))).label("offending"),
    )
    found = connection.execute(counts).one()._mapping
    offending = int(found["offending"])
    if not offending:
        result = CheckResult(
            "correction_values", Status.PASS, 0, detail=f"0 of {found['pending']} pending rows"
        )
        return {schema.check: schema, result.check: result}
    samples = connection.scalars(
        rows.add_columns(corrections.c.id)
        .where(sa.or_(*(wrong for _, wrong in problems)))
        .limit(SAMPLE_LIMIT)
    )
    detail = f"{offending} pending correction row(s) the flush will reject: " + ", ".join(
        f"{what} {found[f'p{i}']}" for i, (what, _) in enumerate(problems) if found[f"p{i}"]
    )
    result = CheckResult("correction_values", Status.FAIL, offending, sorted(samples), detail)
    return {schema.check: schema, result.check: result}
