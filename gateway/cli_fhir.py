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
import json

from sqlalchemy import select

from conf.errors import InvalidInputError
from conf.settings import Settings
from fhir_api.auth import TokenVerifier, mint_development_token
from fhir_api.projection import publish_study
from gateway.app import runtime_for
from storage.models import Study


def cmd_publish(args: argparse.Namespace, settings: Settings) -> int:
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
    """Add ``fhir publish`` to the ``pneumo`` command parser's *subparsers*."""
    fhir = subparsers.add_parser("fhir", help="the FHIR API's resources: (re)publish them")
    actions = fhir.add_subparsers(dest="fhir_command", required=True, metavar="ACTION")
    publish = actions.add_parser("publish", help="(re)build the FHIR resources of every study, or of the given ones")
    publish.add_argument("study_uids", nargs="*", metavar="STUDY_UID")
    publish.set_defaults(handler=cmd_publish)
    token = actions.add_parser("token", help="print a development bearer token (needs [fhir.auth] hs256_secret)")
    token.add_argument("--client-id", default="dev-client")
    token.add_argument("--scope", default="system/*.rs")
    token.add_argument("--ttl", type=int, default=3600, help="seconds")
    token.set_defaults(handler=cmd_token)
