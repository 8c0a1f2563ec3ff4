"""Usage totals from the ledger, summed in SQL."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from shared.models import UsageRecord
from shared.schemas import UsageRow, UsageTotals

_TOTALS = (
    func.count(UsageRecord.id),
    func.coalesce(func.sum(UsageRecord.prompt_tokens), 0),
    func.coalesce(func.sum(UsageRecord.completion_tokens), 0),
    func.coalesce(func.sum(UsageRecord.train_tokens), 0),
    func.coalesce(func.sum(UsageRecord.gpu_seconds), 0.0),
)


def _filtered(query, start: datetime | None, end: datetime | None, key_id: str | None):
    if start is not None:
        query = query.where(UsageRecord.created_at >= start)
    if end is not None:
        query = query.where(UsageRecord.created_at < end)
    if key_id is not None:
        query = query.where(UsageRecord.key_id == key_id)
    return query


def _totals(values) -> dict:
    jobs, prompt, completion, train, seconds = values
    return {
        "jobs": jobs,
        "prompt_tokens": int(prompt),
        "completion_tokens": int(completion),
        "train_tokens": int(train),
        "gpu_seconds": round(float(seconds), 4),
    }


def usage_totals(
    session: Session, key_id: str, start: datetime | None = None, end: datetime | None = None
) -> UsageTotals:
    """Return one key's totals over [start, end)."""
    row = session.execute(_filtered(select(*_TOTALS), start, end, key_id)).one()
    return UsageTotals(**_totals(row))


def usage_report(
    session: Session,
    group_by: str,
    start: datetime | None = None,
    end: datetime | None = None,
    key_id: str | None = None,
) -> list[UsageRow]:
    """Return totals grouped by key, model or UTC day over [start, end)."""
    group = {
        "key": UsageRecord.key_id,
        "model": UsageRecord.model,
        "day": _utc_day(session),
    }[group_by]
    query = _filtered(select(group, *_TOTALS), start, end, key_id).group_by(group).order_by(group)
    return [UsageRow(group=str(values[0]), **_totals(values[1:])) for values in session.execute(query)]


def _utc_day(session: Session) -> ColumnElement:
    """A charge's UTC day as `YYYY-MM-DD` (timestamps are stored naive, in UTC)."""
    if session.get_bind().dialect.name == "postgresql":
        # Not a cast to text: that follows the server's DateStyle (`01/03/2024` under "SQL, DMY",
        # which also sorts April before March).
        return func.to_char(UsageRecord.created_at, "YYYY-MM-DD")
    return func.date(UsageRecord.created_at)
