"""``pneumo health``: the container's HEALTHCHECK (and any supervisor's liveness probe).

Why a command and not ``curl``/a one-line ``urllib`` call in the Dockerfile: the probe must
follow the configuration the server itself runs with. With ``[fhir.tls]`` on, ``/health`` is
HTTPS with the hospital's certificate (and perhaps mutual TLS); a hard-coded
``http://127.0.0.1:8080/health`` would then fail forever and the orchestrator would restart a
healthy gateway in a loop. This command reads the same Settings (``--config``,
``$PNEUMO_CONFIG``, ``PNEUMO_*``) and asks the listener the way a client would.

It connects to loopback when the server binds every interface. The server's certificate chain
is verified against ``[fhir.tls] ca_file`` (the system trust store when unset) but not its host
name: the certificate names the gateway's public DNS name, never 127.0.0.1, and the connection
does not leave the container. Our own certificate is presented as client certificate, so a
listener with ``require_client_cert`` accepts the probe. Exit 0 when ``/health`` answers 200
``{"status": "ok"}``, 1 otherwise (Docker's HEALTHCHECK contract).
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request

from conf.settings import FhirSettings, Settings
from conf.tls import client_context
from gateway.cli_help import add_command

_ANY_ADDRESS = {"0.0.0.0", "::", ""}


def health_url(fhir: FhirSettings) -> str:
    """The URL of our own ``/health`` as seen from inside the host/container."""
    host = fhir.bind
    if host in _ANY_ADDRESS:
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    scheme = "https" if fhir.tls.enabled else "http"
    return f"{scheme}://{host}:{fhir.port}/health"


def cmd_health(args: argparse.Namespace, settings: Settings) -> int:
    url = health_url(settings.fhir)
    context = client_context(settings.fhir.tls, check_hostname=False) if settings.fhir.tls.enabled else None
    try:
        with urllib.request.urlopen(url, timeout=args.timeout, context=context) as response:  # noqa: S310 (our URL)
            body = json.loads(response.read() or b"{}")
            ok = response.status == 200 and body.get("status") == "ok"
    except (OSError, ValueError) as exc:  # URLError, HTTPError, TLS errors, timeouts, bad JSON
        print(json.dumps({"url": url, "ok": False, "error": f"{exc.__class__.__name__}: {exc}"}))
        return 1
    print(json.dumps({"url": url, "ok": ok}))
    return 0 if ok else 1


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    health = add_command(
        commands, "health", summary="probe this gateway's /health (the container HEALTHCHECK)",
        description=(
            "Ask the running gateway's /health the way the configuration says it listens: http or, with\n"
            "[fhir.tls], https verified against [fhir.tls] ca_file (host name not checked: loopback) with\n"
            "our certificate as client certificate. Prints {url, ok}; exit 0 when healthy, else 1."
        ),
        examples=["pneumo health", "pneumo health --config /etc/pneumo/pneumo.toml --timeout 3"],
    )
    health.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)")
    health.set_defaults(handler=cmd_health)

