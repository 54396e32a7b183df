"""``pneumo fhir``: the FHIR projection's operator commands (docs/fhir.md).

``token`` prints a development bearer token (HS256 with ``[fhir.auth] hs256_secret``; never
for production, where the hospital's token service issues RS256/ES256 tokens).

``publish`` (re)builds the FHIR resources of every study (or of the given Study Instance UIDs)
now, in one transaction per study: after an upgrade from a version without the FHIR API, after
``pneumo db reindex``, or to check that the projection is current (it prints how many resources
changed; 0 means the served resources already said everything the index says). Notifications
for changed resources are queued as usual.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import socket

from sqlalchemy import select

from audit.builders import operator_action
from audit.events import Code
from conf.errors import InvalidInputError
from conf.settings import Settings
from fhir_api.auth import TokenVerifier, mint_development_token
from fhir_api.projection import publish_study
from gateway.app import runtime_for
from gateway.cli_db import require_store
from gateway.cli_help import add_command, operator_name
from storage.models import Study

#: The event type of the operator's ``fhir publish`` (an Application Activity, PS3.15 A.5.3.1).
FHIR_REPUBLISHED = Code("FHIR-PUBLISH", "99PNEUMO", "Operator republished the FHIR resources")


def cmd_publish(args: argparse.Namespace, settings: Settings) -> int:
    require_store(settings, args.config)
    with runtime_for(settings) as runtime:
        with runtime.database.read_session() as session:
            query = select(Study.id).order_by(Study.id)
            if args.study_uids:
                query = query.where(Study.study_instance_uid.in_(args.study_uids))
            study_pks = list(session.execute(query).scalars())
        changed = notifications = 0
        for study_pk in study_pks:
            with runtime.database.session() as session:
                stored, queued = publish_study(session, study_pk)
            changed += len(stored)
            notifications += queued
        scope = f"{len(study_pks)} given" if args.study_uids else f"all {len(study_pks)}"
        event = operator_action(
            runtime.audit_source, operator=operator_name(), host=socket.gethostname(), when=dt.datetime.now(dt.UTC),
            description=f"FHIR resources republished for {scope} studies: {changed} changed, "
                        f"{notifications} notifications queued",
        )
        runtime.audit(dataclasses.replace(event, event_types=(FHIR_REPUBLISHED,)))
    print(json.dumps({"studies": len(study_pks), "resources_changed": changed, "notifications_queued": notifications}))
    return 0



def cmd_token(args: argparse.Namespace, settings: Settings) -> int:
    """Print a development access token (HS256, ``[fhir.auth] hs256_secret``) and check it verifies."""
    try:
        token = mint_development_token(settings.fhir.auth, client_id=args.client_id, scope=args.scope,
                                       ttl_seconds=args.ttl)
        TokenVerifier(settings.fhir.auth, bind=settings.fhir.bind).verify(f"Bearer {token}")
    except InvalidInputError as exc:
        print(json.dumps({"error": str(exc)}))
        return 2
    print(token)
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``fhir publish|token`` to the ``pneumo`` command parser's *subparsers*."""
    fhir = add_command(
        subparsers, "fhir", summary="the FHIR API's resources: (re)publish them; a development token",
        description="Operator commands of the FHIR R4 API that `pneumo serve` runs at /fhir (docs/fhir.md).",
        examples=["pneumo fhir publish", "pneumo fhir token --scope 'system/*.rs'"],
    )
    actions = fhir.add_subparsers(dest="fhir_command", required=True, metavar="ACTION")
    publish = add_command(
        actions, "publish", summary="(re)build the FHIR resources of every study, or of the given ones",
        description=(
            "(Re)build the FHIR resources of every study, or of the given Study Instance UIDs, one\n"
            "transaction per study; prints {studies, resources_changed, notifications_queued} (0 changed:\n"
            "the served resources were current). Needs an existing store (exit 2 when there is none)."
        ),
        examples=["pneumo fhir publish", "pneumo fhir publish 1.2.826.0.1.3680043.8.498.1"],
    )
    publish.add_argument("study_uids", nargs="*", metavar="STUDY_UID", help="only these studies (default: all)")
    publish.set_defaults(handler=cmd_publish)
    token = add_command(
        actions, "token", summary="print a development bearer token (needs [fhir.auth] hs256_secret)",
        description=(
            "Print an HS256 bearer token signed with [fhir.auth] hs256_secret, checked against the API's\n"
            "own verifier. For development only: in production the hospital's token service issues them."
        ),
        examples=["curl -H \"Authorization: Bearer $(pneumo fhir token)\" 127.0.0.1:8080/fhir/DiagnosticReport"],
    )
    token.add_argument("--client-id", default="dev-client", help="the token's client_id (default: dev-client)")
    token.add_argument("--scope", default="system/*.rs", help="SMART scopes (default: system/*.rs)")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default: 3600)")
    token.set_defaults(handler=cmd_token)
