"""SQL statements built once, for the few queries on the rater's hot path.

On a submit, compiling querysets cost the server more CPU than PostgreSQL spent running the
statements. These helpers build each statement from the models' metadata the first time it
is needed (so a renamed column or a new field cannot drift from the model) and reuse it.
Everything else uses the ORM.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any, TypeVar

from django.db import connection, models

M = TypeVar("M", bound=models.Model)


def _qn(name: str | None) -> str:
    assert name is not None  # table and column names are always set on concrete models
    return connection.ops.quote_name(name)


def table(model: type[models.Model]) -> str:
    """The model's table name, quoted for SQL."""
    return _qn(model._meta.db_table)


def column(model: type[models.Model], name: str) -> str:
    """The column of field ``name`` (a field name or an attname, ``pk`` for the primary key),
    quoted for SQL."""
    meta = model._meta
    if name == "pk":
        return _qn(meta.pk.column if meta.pk else None)
    for f in meta.concrete_fields:
        if name in (f.name, f.attname):
            return _qn(f.column)
    raise LookupError(f"{meta.label} has no concrete field {name!r}")


@cache
def _insert_sql(model: type[models.Model], vendor: str) -> tuple[str, tuple[models.Field, ...]]:
    meta = model._meta
    fields = tuple(f for f in meta.concrete_fields if not f.primary_key)
    columns = ", ".join(_qn(f.column) for f in fields)
    placeholders = ", ".join(["%s"] * len(fields))
    sql = (
        f"INSERT INTO {_qn(meta.db_table)} ({columns}) VALUES ({placeholders})"
        f" RETURNING {column(model, 'pk')}"
    )
    return sql, fields


def insert(obj: M) -> M:
    """``INSERT`` ``obj`` (a new instance of a model with an automatic primary key), as
    ``obj.save(force_insert=True)`` would: same defaults, ``auto_now_add`` values and database
    conversions; sets ``obj.pk``. Raises ``IntegrityError`` like ``save`` does."""
    sql, fields = _insert_sql(type(obj), connection.vendor)
    params = [f.get_db_prep_save(f.pre_save(obj, True), connection) for f in fields]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        obj.pk = cursor.fetchone()[0]
    obj._state.adding = False
    obj._state.db = connection.alias
    return obj


@cache
def _select_sql(
    model: type[models.Model], attnames: tuple[str, ...], where: tuple[str, ...], vendor: str
) -> str:
    meta = model._meta
    by_attname = {f.attname: f for f in meta.concrete_fields}
    columns = ", ".join(_qn(by_attname[a].column) for a in attnames)
    conditions = " AND ".join(f"{_qn(by_attname[a].column)} = %s" for a in where)
    return f"SELECT {columns} FROM {_qn(meta.db_table)} WHERE {conditions}"


def in_model_order(model: type[models.Model], attnames: Sequence[str]) -> tuple[str, ...]:
    """``attnames`` in the order of the model's fields: the order ``Model.from_db`` takes
    values in when it is given fewer than all of them."""
    order = {f.attname: i for i, f in enumerate(model._meta.concrete_fields)}
    return tuple(sorted(attnames, key=order.__getitem__))


def get_for_update(model: type[M], *, attnames: Sequence[str], where: dict[str, Any]) -> M | None:
    """The row of ``model`` matching ``where`` (equality on attnames), locked ``FOR UPDATE``
    where the database has row locks (SQLite locks the whole database for the transaction
    instead), loaded with only ``attnames``; ``None`` if there is none. Call it inside
    ``transaction.atomic``. Values in ``where`` must be plain (ints, strings)."""
    attnames = in_model_order(model, attnames)
    sql = _select_sql(model, attnames, tuple(where), connection.vendor) + lock_clause()
    with connection.cursor() as cursor:
        cursor.execute(sql, list(where.values()))
        row = cursor.fetchone()
    return None if row is None else from_row(model, attnames, row)


def _convert(field: models.Field[Any, Any], value: Any) -> Any:
    column = field.cached_col  # what the ORM hands converters
    for converter in connection.ops.get_db_converters(column) + field.get_db_converters(connection):
        value = converter(value, column, connection)
    return value


def to_python(model: type[models.Model], attname: str, value: Any) -> Any:
    """A value of field ``attname`` as read from the database, converted as the ORM would."""
    return _convert(model._meta.get_field(attname), value)  # type: ignore[arg-type]


def fetch_one(model: type[M], sql: str, params: Sequence[Any]) -> M | None:
    """The first row ``sql`` returns as a ``model`` instance (``sql`` selects ``columns``)."""
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    return None if row is None else from_row(model, None, row)


def lock_clause(*, skip_locked: bool = False) -> str:
    """`` FOR UPDATE`` (``SKIP LOCKED``) where the database has row locks, else nothing:
    SQLite serialises writers instead (the project opens its transactions IMMEDIATE)."""
    features = connection.features
    if not features.has_select_for_update:
        return ""
    if skip_locked and features.has_select_for_update_skip_locked:
        return " FOR UPDATE SKIP LOCKED"
    return " FOR UPDATE"


def columns(model: type[models.Model], alias: str = "") -> str:
    """Every concrete column of ``model`` in field order (what ``from_row`` takes without
    ``attnames``), each prefixed with ``alias.`` when given."""
    prefix = f"{alias}." if alias else ""
    return ", ".join(prefix + _qn(f.column) for f in model._meta.concrete_fields)


def from_row(model: type[M], attnames: Sequence[str] | None, row: Sequence[Any]) -> M:
    """A model instance from a database row, with the conversions the ORM applies.
    ``attnames`` in model order (``in_model_order``); ``None`` for every field, as
    ``columns`` selects them."""
    fields: Sequence[models.Field[Any, Any]] = model._meta.concrete_fields
    if attnames is not None:
        by_attname = {f.attname: f for f in fields}
        fields = [by_attname[a] for a in attnames]
    values = [_convert(field, value) for field, value in zip(fields, row, strict=True)]
    names = [f.attname for f in fields]
    return model.from_db(connection.alias, names, values)


@cache
def _update_sql(
    model: type[models.Model], attnames: tuple[str, ...], vendor: str
) -> tuple[str, tuple[models.Field, ...]]:
    meta = model._meta
    by_attname = {f.attname: f for f in meta.concrete_fields}
    fields = tuple(by_attname[a] for a in attnames)
    assignments = ", ".join(f"{_qn(f.column)} = %s" for f in fields)
    sql = f"UPDATE {_qn(meta.db_table)} SET {assignments} WHERE {column(model, 'pk')} = %s"
    return sql, fields


def update_by_pk(model: type[models.Model], pk: Any, **values: Any) -> int:
    """``UPDATE`` the row ``pk`` of ``model`` with ``values`` (by attname), converted as the
    fields convert them; returns the number of rows changed."""
    sql, fields = _update_sql(model, tuple(values), connection.vendor)
    params = [
        f.get_db_prep_save(v, connection) for f, v in zip(fields, values.values(), strict=True)
    ]
    with connection.cursor() as cursor:
        cursor.execute(sql, [*params, pk])
        return cursor.rowcount
