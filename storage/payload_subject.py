"""``job.payload``'s ``subject`` as text, spelled identically in an index and in a query.

Why a construct of its own: a delivery's subject lives in the job's JSON payload, and the console
finds a study's HL7/FHIR deliveries by it (``study-result/<pk>``). That lookup is only cheap with
an expression index, and a database uses one only when the query spells the expression exactly as
the index does. SQLAlchemy's ``payload["subject"].as_string()`` binds the key as a parameter
(PostgreSQL then cannot match the index in a generic plan) and quotes the path differently from a
hand-written SQLite index; this construct renders the key as a literal on both backends, so the
model's :class:`~sqlalchemy.Index`, migration 0015 and every query say the same thing.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import String
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement


class DeliverySubject(FunctionElement[str]):
    """``DeliverySubject(Job.payload)``: the payload's ``subject`` key as text (NULL when absent)."""

    type = String()
    inherit_cache = True
    name = "delivery_subject"


@compiles(DeliverySubject)
def _json_extract(element: DeliverySubject, compiler: SQLCompiler, **kw: Any) -> str:
    return f"json_extract({compiler.process(element.clauses, **kw)}, '$.subject')"


@compiles(DeliverySubject, "postgresql")
def _arrow_text(element: DeliverySubject, compiler: SQLCompiler, **kw: Any) -> str:
    return f"({compiler.process(element.clauses, **kw)} ->> 'subject')"
