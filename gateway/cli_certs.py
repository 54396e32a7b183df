"""``pneumo certs dev``: a development CA and certificates for trying TLS (:mod:`conf.dev_pki`).

Prints where it wrote the files and the ``[dicom.tls]`` / ``[hl7.tls]`` / ``[fhir.tls]`` lines that use
them. Never for production: there the hospital's CA issues the certificates (docs/security.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from conf.dev_pki import DEFAULT_HOSTS, make_dev_pki
from conf.settings import Settings
from gateway.cli_help import add_command


def cmd_certs_dev(args: argparse.Namespace, settings: Settings) -> int:
    directory = args.dir if args.dir is not None else settings.data_dir / "certs"
    try:
        pki = make_dev_pki(directory, hosts=args.host or DEFAULT_HOSTS, days=args.days, overwrite=args.overwrite)
    except FileExistsError as exc:
        print(f"pneumo: {exc}", file=sys.stderr)
        return 1
    print(f"# development certificates written to {directory} (files: {', '.join(p.name for p in pki.files().values())})")
    print("# use them in pneumo.toml, in each of [dicom.tls], [hl7.tls] and [fhir.tls]:")
    print(f'cert_file = "{pki.server_cert}"\nkey_file = "{pki.server_key}"\nca_file = "{pki.ca_cert}"')
    print(f"# a peer's client certificate: {pki.client_cert} with its key {pki.client_key}")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``certs dev`` to the ``pneumo`` command parser's *subparsers*."""
    certs = add_command(
        subparsers, "certs", summary="TLS certificates: a development CA and certificates",
        description="TLS certificate tools (docs/security.md). Production certificates come from the hospital's CA.",
        examples=["pneumo certs dev", "pneumo certs dev --host pneumo.lab.example --host 10.0.0.5"],
    )
    actions = certs.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    dev = add_command(
        actions, "dev", summary="make a development CA, server and client certificates",
        description=(
            "Write a development CA (ca.pem/ca.key), this gateway's certificate (server.pem/server.key,\n"
            "server and client use) and a peer's client certificate (client.pem/client.key) into DIR\n"
            "(default <data_dir>/certs). ECDSA P-256, valid --days days. Keys are written with mode 0600;\n"
            "existing files are kept unless --overwrite. For development and test labs only."
        ),
        examples=["pneumo certs dev", "pneumo certs dev --dir /etc/pneumo/certs --host pneumo.lab.example"],
    )
    dev.add_argument("--dir", type=Path, default=None, help="where to write (default: <data_dir>/certs)")
    dev.add_argument(
        "--host", action="append", default=None,
        help="a host name or address the server certificate is valid for (repeatable; default: localhost, "
        "127.0.0.1, ::1)",
    )
    dev.add_argument("--days", type=int, default=90, help="validity in days (default: 90)")
    dev.add_argument("--overwrite", action="store_true", help="replace existing files")
    dev.set_defaults(handler=cmd_certs_dev)
