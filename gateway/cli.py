"""``pneumo``: the command line of Pneumo Gateway.

Every command takes ``--config PATH``, before or after the command name (default
``$PNEUMO_CONFIG``, else ``./pneumo.toml`` when present), and builds the one Settings object from
it and the ``PNEUMO_*`` environment. Only ``serve``, ``worker``, ``db reindex`` and ``db upgrade``
(an empty PostgreSQL database) create a store;
the commands that read one fail (exit 2) when it is not where the configuration points, and say on
stderr which configuration and database they used.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from audit.anchor import AnchorFile, AuditKeyError, load_signer, verify_anchored
from conf.errors import ConflictError, InvalidInputError
from conf.logging import configure_logging
from conf.settings import Settings, load_settings
from conf.tls import describe as describe_tls
from gateway.acceptors import die_with_parent, parent_alive
from gateway.app import DicomOnly, Gateway, Workers, build_engine, process_event, runtime_for
from gateway.cli_audit import register as register_audit_export
from gateway.cli_certs import register as register_certs
from gateway.cli_db import announce_store, existing_store
from gateway.cli_db import register as register_db
from gateway.cli_deliveries import register as register_deliveries
from gateway.cli_fhir import register as register_fhir
from gateway.cli_health import register as register_health
from gateway.cli_help import CONFIG_HELP, accept_config_everywhere, add_command, default_config
from gateway.cli_keys import register as register_keys
from gateway.cli_status import register as register_status
from inference.applicability import rules_from_settings
from inference.engine import InferenceEngine
from inference.errors import ModelPackageError, PreprocessingError
from inference.manifest import BUNDLED_MODEL_DIR, load_manifest
from inference.pipeline import ClassificationOutcome, classify_file
from storage.db import StoreNotFoundError, display_url
from storage.integrity import StoreIntegrityError
from storage.inventory import list_instances
from storage.study_results import list_studies
from storage.wakeup import DELIVER, INFER, WakeListener

log = structlog.get_logger(__name__)

Command = Callable[[argparse.Namespace, Settings], int]


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Run the DICOM node and the HTTP server until SIGTERM/SIGINT (after the start-up checks)."""
    announce_store(args.config, display_url(settings.effective_database_url))
    with runtime_for(settings, startup_checks=True) as runtime:
        gateway = Gateway(runtime, config_path=args.config)
        stop = _stop_on_signals()
        try:
            gateway.start()
            _announce({"event": "ready", "dicom_port": gateway.dicom.port, "http_port": gateway.http.port,
                       "hl7_port": gateway.hl7.port if gateway.hl7 else None,
                       "dicom_tls": describe_tls(settings.dicom.tls), "hl7_tls": describe_tls(settings.hl7.tls),
                       "http_tls": describe_tls(settings.fhir.tls)})
            while not stop.wait(1.0):
                pass
        finally:
            gateway.stop()
    return 0


def cmd_acceptor(args: argparse.Namespace, settings: Settings) -> int:
    """(internal) An extra DICOM acceptor process started by ``pneumo serve``."""
    with runtime_for(settings, migrate=False) as runtime:
        node = DicomOnly(runtime)
        stop = _stop_on_signals()
        try:
            node.start()
            _announce({"event": "ready", "dicom_port": node.dicom.port, "dicom_tls": describe_tls(settings.dicom.tls)})
            while not stop.wait(1.0):
                if not parent_alive(args.parent):
                    log.warning("dicom.acceptor_orphaned")
                    break
        finally:
            node.stop()
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    """Run only the job workers (inference, study results, delivery): as a worker process of
    ``pneumo serve`` (``--parent``), or by hand, e.g. on extra hosts sharing PostgreSQL."""
    parent: int | None = args.parent
    if parent is not None:
        die_with_parent()
    else:
        announce_store(args.config, display_url(settings.effective_database_url))
    # A worker process of `pneumo serve` leaves the start-up checks and migrations to its parent,
    # which ran them before starting it (and must not be raced by its children doing the same).
    with runtime_for(settings, startup_checks=parent is None, migrate=parent is None) as runtime:
        workers = Workers(runtime, build_engine(settings))
        listeners = [WakeListener(settings.wake_dir, INFER, workers.wake_inferers),
                     WakeListener(settings.wake_dir, DELIVER, workers.wake_deliverers)]
        stop = _stop_on_signals()
        audited = False
        try:
            workers.start()
            for listener in listeners:
                listener.start()
            if parent is None:  # a worker process of `pneumo serve` is covered by serve's own records
                runtime.audit(process_event(runtime, started=True, process_name="pneumo worker", config_path=args.config))
                audited = True
            _announce({"event": "ready", "workers": len(workers.all)})
            while not stop.wait(1.0):
                if parent is not None and not parent_alive(parent):
                    log.warning("worker.orphaned")
                    break
        finally:
            for listener in listeners:
                listener.stop()
            workers.stop()
            if audited:
                runtime.audit(process_event(runtime, started=False, process_name="pneumo worker"))
    return 0


def _announce(event: dict[str, Any]) -> None:
    """The one stdout line a supervisor (or a test) waits for; logs go to stderr."""
    print(json.dumps(event), flush=True)


def cmd_infer(args: argparse.Namespace, settings: Settings) -> int:
    """Classify DICOM files directly (no database): one JSON line per file."""
    engine = build_engine(settings if args.model is None else _with_model(settings, args.model))
    rules = rules_from_settings(settings.inference)
    unreadable = 0
    try:
        for path in args.files:
            try:
                outcome = classify_file(path, engine, rules)
            except (PreprocessingError, OSError) as exc:
                unreadable += 1
                print(json.dumps({"file": str(path), "error": f"{exc.__class__.__name__}: {exc}"}))
                continue
            print(json.dumps(infer_record(str(path), outcome, engine)))
    finally:
        engine.close()
    return 1 if unreadable else 0


def infer_record(path: str, outcome: ClassificationOutcome, engine: InferenceEngine) -> dict[str, Any]:
    """The documented ``pneumo infer`` output shape (pure)."""
    prediction = outcome.prediction
    timings = prediction.timings_ms if prediction is not None else outcome.timings_ms
    return {
        "file": path,
        "sop_instance_uid": outcome.sop_instance_uid,
        "applicable": outcome.applicable,
        "reason": outcome.reason,
        "probability": None if prediction is None else round(float(prediction.probability), 6),
        "label": None if prediction is None else prediction.label,
        "threshold": engine.manifest.threshold,
        "model": {"id": engine.manifest.id, "version": engine.manifest.version},
        "timings_ms": {k: round(float(timings[k]), 3) for k in ("decode", "preprocess", "infer") if k in timings},
    }


def _with_model(settings: Settings, model_dir: Path) -> Settings:
    return settings.model_copy(update={"inference": settings.inference.model_copy(update={"model_dir": model_dir})})


def cmd_model_info(args: argparse.Namespace, settings: Settings) -> int:
    """Print the model manifest after verifying the ONNX file's SHA-256 (exit 1 on mismatch)."""
    model_dir = args.model or settings.inference.model_dir or BUNDLED_MODEL_DIR
    try:
        manifest = load_manifest(model_dir)
    except ModelPackageError as exc:
        print(json.dumps({"model_dir": str(model_dir), "ok": False, "error": str(exc)}))
        return 1
    raw = json.loads((Path(model_dir) / "model.json").read_text())
    print(json.dumps({"model_dir": str(model_dir), "ok": True, "device_uid": manifest.device_uid, "manifest": raw}, indent=2))
    return 0


def cmd_model_train(args: argparse.Namespace, settings: Settings) -> int:
    """Train the classifier (needs the `train` extra: PyTorch)."""
    from inference.training.train import main as train_main

    return int(train_main(_passthrough(args.rest)))


def cmd_model_export(args: argparse.Namespace, settings: Settings) -> int:
    """Export a training checkpoint to an ONNX model package (needs the `train` extra)."""
    from inference.training.export import main as export_main

    return int(export_main(_passthrough(args.rest)))


def _passthrough(rest: list[str]) -> list[str]:
    return rest[1:] if rest[:1] == ["--"] else rest


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def _request_stop(signum: int, _frame: Any) -> None:
        log.info("gateway.signal", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)
    return stop


def _instance_rows(args: argparse.Namespace, settings: Settings) -> list[dict[str, Any]]:
    with existing_store(settings, args.config) as database, database.read_session() as session:
        rows = list_instances(session)
    store_root = settings.dicom_dir.resolve()
    for row in rows:
        row["path"] = str(store_root / row.pop("relative_path"))
    return rows


def cmd_instances(args: argparse.Namespace, settings: Settings) -> int:
    """List stored instances with their kind and outcome (JSON lines with --json)."""
    rows = _instance_rows(args, settings)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"{'SOP Instance UID':<64} {'kind':<5} {'AE':<16} {'size':>10} {'outcome':<14} reason")
    for row in rows:
        print(
            f"{row['sop_instance_uid']:<64} {row['kind']:<5} {row['calling_ae'] or '-':<16} {row['size']:>10} "
            f"{row['outcome']:<14} {_reason_text(row)}"
        )
    print(f"{len(rows)} instance(s)")
    return 0


def _reason_text(row: dict[str, Any]) -> str:
    if row["reason"]:
        return str(row["reason"])
    if row["label"] is not None and row["probability"] is not None:
        return f"{row['label']} (p={row['probability']:.3f})"
    return "-"


def cmd_studies(args: argparse.Namespace, settings: Settings) -> int:
    """List studies with their study result: final, amended, not-analysed, or pending."""
    with existing_store(settings, args.config) as database, database.read_session() as session:
        rows = list_studies(session)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"{'Study Instance UID':<64} {'accession':<16} {'status':<13} {'label':<10} {'p':>6} {'analysed':>8}  reasons")
    for row in rows:
        probability = "-" if row["probability"] is None else f"{row['probability']:.3f}"
        reasons = "; ".join(f"{r['reason']} ({r['images']})" for r in row["reasons"]) or "-"
        print(
            f"{row['study_instance_uid']:<64} {row['accession_number'] or '-':<16} {row['status']:<13} "
            f"{row['label'] or '-':<10} {probability:>6} {row['analysed']:>3}/{row['images']:<4}  {reasons}"
        )
    print(f"{len(rows)} stud{'y' if len(rows) == 1 else 'ies'}")
    return 0


def cmd_audit_verify(args: argparse.Namespace, settings: Settings) -> int:
    """Recompute the audit hash chain (with the HMAC key, if configured) and check it against the
    anchor checkpoints; exit 1 if any record was edited, removed, reordered or re-hashed."""
    signer = load_signer(settings.audit.hmac_key_file, settings.audit.retired_hmac_key_files)
    anchor = AnchorFile(settings.audit_anchor_file)
    with existing_store(settings, args.config) as database, database.read_session() as session:
        result = verify_anchored(session, signer, anchor)
    print(json.dumps({
        "ok": result.ok, "records": result.records, "first_bad_seq": result.first_bad_seq, "problem": result.problem,
        "keyed_from_seq": result.keyed_from_seq, "anchored_seq": result.anchored_seq, "anchor_file": str(anchor.path),
    }))
    if not result.ok:
        print(f"pneumo: audit log NOT intact at record {result.first_bad_seq}: {result.problem}", file=sys.stderr)
    elif result.records and result.anchored_seq is None:  # a new install: `pneumo serve` has not run yet
        print("pneumo: no anchor checkpoint yet (`pneumo serve` writes the first at its start): the chain is "
              "intact, but removal of its newest records cannot be ruled out until then", file=sys.stderr)
    return 0 if result.ok else 1


SERVE_DESCRIPTION = """\
Run the gateway until SIGTERM/SIGINT (in-flight associations finish first):

  DICOM node   [dicom] bind:port (default 0.0.0.0:11112; the shipped pneumo.toml: 127.0.0.1:11112):
               Verification, Storage SCP, Study Root Query/Retrieve (C-FIND/C-MOVE/C-GET), for the
               [[dicom.peers]] only; [dicom] acceptor_processes > 1 adds acceptor processes on the port
  HTTP         [fhir] bind:port (default 127.0.0.1:8080): /health, /ready, the FHIR R4 API at /fhir
               and the operator console at /console ([console]; docs/console.md)
  HL7 MLLP     [hl7] bind:port (default 127.0.0.1:2575), unless [hl7] enabled = false
  workers      inference, study results, FHIR projection and delivery ([worker] enabled = true)

Settings come from --config PATH, else $PNEUMO_CONFIG, else ./pneumo.toml when present, else the
built-in defaults, with PNEUMO_* environment variables on top (PNEUMO_DICOM__PORT=104). The store
(database and files under data_dir: default ./var, relative to the working directory) is created and
migrated on first start, after the start-up checks (`pneumo db check`). When ready it prints one JSON
line on stdout: {"event": "ready", "dicom_port": ..., "http_port": ..., "hl7_port": ...}; logs go to
stderr ([log] level, format)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pneumo",
        description="Pneumo Gateway: DICOM in, pneumonia classifier, SR / FHIR / HL7 out, audited.",
        epilog=(
            "Every command takes --config PATH, before or after the command name. Commands that read the\n"
            "store never create one: they fail (exit 2) when it is not where the configuration points.\n"
            "`pneumo COMMAND --help` describes each command.\n\n"
            "examples:\n  pneumo --config /etc/pneumo/pneumo.toml serve\n  pneumo instances --config pneumo.toml\n"
            "  PNEUMO_CONFIG=/etc/pneumo/pneumo.toml pneumo audit verify"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, default=default_config(), metavar="PATH", help=CONFIG_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = add_command(
        commands, "serve", summary="run the gateway: DICOM node, HTTP (health, readiness, FHIR), HL7 MLLP, workers",
        description=SERVE_DESCRIPTION,
        examples=["pneumo serve", "pneumo --config /etc/pneumo/pneumo.toml serve", "PNEUMO_DICOM__PORT=104 pneumo serve"],
    )
    serve.set_defaults(handler=cmd_serve)

    worker = add_command(
        commands, "worker", summary="run only the job workers (inference, study results, delivery)",
        description=(
            "Run only the job workers (inference, study results, FHIR projection, delivery), e.g. as extra\n"
            "processes or hosts sharing one PostgreSQL database with `pneumo serve`. Runs the start-up\n"
            "checks first; prints {\"event\": \"ready\", \"workers\": N} when running; stops on SIGTERM/SIGINT."
        ),
        examples=["PNEUMO_DATABASE_URL=postgresql+psycopg://pneumo@db/pneumo pneumo worker"],
    )
    worker.add_argument("--parent", type=int, default=None,
                        help="(internal) process id of the supervising `pneumo serve`: exit with it")
    worker.set_defaults(handler=cmd_worker)

    instances = add_command(
        commands, "instances", summary="list stored instances: kind, outcome and why",
        description=(
            "Every stored instance, received and generated, oldest first: SOP Instance UID, kind (image,\n"
            "SR, SC), calling AE, size, outcome and reason. The outcome is pending or running while the\n"
            "analysis is queued, then ok (the label and probability), not-applicable (the rule that excluded\n"
            "the image, e.g. a CT or a non-chest image: no SR is made) or failed (the cause); generated for\n"
            "our own SR and summary image. Reads the existing store only (exit 2 when there is none)."
        ),
        examples=["pneumo instances", "pneumo instances --json --config /etc/pneumo/pneumo.toml"],
    )
    instances.add_argument("--json", action="store_true", help="one JSON object per line (every column, with path and UIDs)")
    instances.set_defaults(handler=cmd_instances)

    studies = add_command(
        commands, "studies", summary="list studies and their study results (what the EHR is told)",
        description=(
            "One line per study: its current study result (final, amended, not-analysed, or pending while\n"
            "the study is still arriving), label, probability, images analysed/received and why the others\n"
            "were not analysed. Reads the existing store only (exit 2 when there is none)."
        ),
        examples=["pneumo studies", "pneumo studies --json"],
    )
    studies.add_argument("--json", action="store_true", help="one JSON object per line")
    studies.set_defaults(handler=cmd_studies)

    # (internal) started by `pneumo serve` itself: no summary, so it is not listed.
    acceptor = add_command(
        commands, "acceptor", summary=None,
        description="(internal) An extra DICOM acceptor process, started and supervised by `pneumo serve`.",
        examples=["pneumo acceptor --parent 1234   # started by pneumo serve, not by hand"],
    )
    acceptor.add_argument("--parent", type=int, required=True, help="process id of the supervising `pneumo serve`")
    acceptor.set_defaults(handler=cmd_acceptor)

    infer = add_command(
        commands, "infer", summary="classify DICOM files, one JSON line per file (no database)",
        description=(
            "Classify DICOM files directly, without the database or the network: one JSON line per file\n"
            "with applicable/reason, probability, label, threshold, model and timings. Exit 1 when a file\n"
            "could not be read."
        ),
        examples=["pneumo infer chest.dcm", "pneumo infer --model ./my-model *.dcm"],
    )
    infer.add_argument("files", nargs="+", type=Path, metavar="FILE.dcm", help="DICOM files to classify")
    infer.add_argument("--model", type=Path, default=None, help="model package directory (default: configured/bundled)")
    infer.set_defaults(handler=cmd_infer)

    model = add_command(
        commands, "model", summary="model package tools: info, train, export",
        description="Inspect, train and export the classifier's model package (train/export need the train extra).",
        examples=["pneumo model info", "pneumo model train -- --help"],
    )
    model_commands = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    info = add_command(
        model_commands, "info", summary="print the manifest and verify the ONNX hash",
        description="Print the model package's manifest after verifying the ONNX file's SHA-256 (exit 1 on mismatch).",
        examples=["pneumo model info", "pneumo model info --model ./my-model"],
    )
    info.add_argument("--model", type=Path, default=None, help="model package directory (default: configured/bundled)")
    info.set_defaults(handler=cmd_model_info)
    train = add_command(
        model_commands, "train", summary="train EfficientNet-B0 (train extra); options: pneumo model train -- --help",
        description="Train the classifier (needs the train extra: PyTorch); everything after -- goes to the trainer.",
        examples=["pneumo model train -- --help"],
    )
    train.add_argument("rest", nargs=argparse.REMAINDER, help="the trainer's own options, after --")
    train.set_defaults(handler=cmd_model_train)
    export = add_command(
        model_commands, "export", summary="export a checkpoint to ONNX + manifest (train extra)",
        description="Export a training checkpoint to an ONNX model package (needs the train extra).",
        examples=["pneumo model export -- --help"],
    )
    export.add_argument("rest", nargs=argparse.REMAINDER, help="the exporter's own options, after --")
    export.set_defaults(handler=cmd_model_export)

    register_deliveries(commands)
    register_fhir(commands)
    register_db(commands)
    register_certs(commands)
    register_keys(commands)
    register_status(commands)
    register_health(commands)

    audit = add_command(
        commands, "audit", summary="audit log tools",
        description="Tools for the hash-chained audit log (PS3.15 events) in the database.",
        examples=["pneumo audit verify"],
    )
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    verify = add_command(
        audit_commands, "verify", summary="verify the hash chain of the audit log",
        description=(
            "Recompute the audit log's hash chain (HMAC with [audit] hmac_key_file when set) and check it\n"
            "against the anchor checkpoints. Prints {ok, records, first_bad_seq, problem, ...}; exit 1 if any\n"
            "record was edited, removed, reordered or re-hashed. Reads the existing store only (exit 2 when\n"
            "there is none)."
        ),
        examples=["pneumo audit verify", "pneumo audit verify --config /etc/pneumo/pneumo.toml"],
    )
    verify.set_defaults(handler=cmd_audit_verify)
    register_audit_export(audit_commands)
    accept_config_everywhere(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except (FileNotFoundError, ValueError) as exc:
        print(f"pneumo: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log)
    handler: Command = args.handler
    try:
        return handler(args, settings)
    except ModelPackageError as exc:
        print(f"pneumo: model package refused: {exc}", file=sys.stderr)
        return 2
    except StoreIntegrityError as exc:
        print(f"pneumo: refusing to start: {exc}", file=sys.stderr)
        return 2
    except AuditKeyError as exc:
        print(f"pneumo: audit key refused: {exc}", file=sys.stderr)
        return 2
    except InvalidInputError as exc:  # a setting that is valid alone but not together (e.g. [fhir.auth])
        print(f"pneumo: configuration error: {exc}", file=sys.stderr)
        return 2
    except (StoreNotFoundError, ConflictError) as exc:  # no store where the configuration points
        print(f"pneumo: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
