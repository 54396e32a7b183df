"""``pneumo``: the command line of Pneumo Gateway.

Every command takes ``--config PATH`` (default ``./pneumo.toml`` when present) and builds the one
Settings object from it and the ``PNEUMO_*`` environment.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import and_, select

from audit.anchor import AnchorFile, AuditKeyError, load_signer, verify_anchored
from conf.errors import InvalidInputError
from conf.logging import configure_logging
from conf.settings import Settings, load_settings
from gateway.acceptors import parent_alive
from gateway.app import DicomOnly, Gateway, Workers, build_engine, runtime_for
from gateway.cli_db import register as register_db
from gateway.cli_deliveries import register as register_deliveries
from gateway.cli_fhir import register as register_fhir
from inference.applicability import rules_from_settings
from inference.engine import InferenceEngine
from inference.errors import ModelPackageError, PreprocessingError
from inference.manifest import BUNDLED_MODEL_DIR, load_manifest
from inference.pipeline import ClassificationOutcome, classify_file
from storage.integrity import StoreIntegrityError
from storage.job_kinds import INFER_JOB
from storage.models import Instance, Job, Series, Study
from storage.study_results import list_studies

log = structlog.get_logger(__name__)

Command = Callable[[argparse.Namespace, Settings], int]


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Run the DICOM node and the HTTP server until SIGTERM/SIGINT (after the start-up checks)."""
    with runtime_for(settings, startup_checks=True) as runtime:
        gateway = Gateway(runtime, config_path=args.config)
        stop = _stop_on_signals()
        try:
            gateway.start()
            _announce({"event": "ready", "dicom_port": gateway.dicom.port, "http_port": gateway.http.port,
                       "hl7_port": gateway.hl7.port if gateway.hl7 else None})
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
            _announce({"event": "ready", "dicom_port": node.dicom.port})
            while not stop.wait(1.0):
                if not parent_alive(args.parent):
                    log.warning("dicom.acceptor_orphaned")
                    break
        finally:
            node.stop()
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    """Run only the job workers (inference, study results, delivery), e.g. on extra hosts sharing PostgreSQL."""
    with runtime_for(settings, startup_checks=True) as runtime:
        workers = Workers(runtime, build_engine(settings))
        stop = _stop_on_signals()
        try:
            workers.start()
            _announce({"event": "ready", "workers": len(workers.all)})
            while not stop.wait(1.0):
                pass
        finally:
            workers.stop()
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


def _instance_rows(settings: Settings) -> list[dict[str, Any]]:
    with runtime_for(settings) as runtime, runtime.database.read_session() as session:
        rows = session.execute(
            select(Instance, Series.series_instance_uid, Study.study_instance_uid, Job.state)
            .join(Series, Instance.series_pk == Series.id)
            .join(Study, Series.study_pk == Study.id)
            .outerjoin(Job, and_(Job.instance_pk == Instance.id, Job.kind == INFER_JOB))
            .order_by(Instance.id)
        ).all()
        return [
            {
                "sop_instance_uid": inst.sop_instance_uid,
                "sop_class_uid": inst.sop_class_uid,
                "study_instance_uid": study_uid,
                "series_instance_uid": series_uid,
                "transfer_syntax_uid": inst.transfer_syntax_uid,
                "size": inst.size,
                "sha256": inst.sha256,
                "received_at": inst.received_at.isoformat(),
                "calling_ae": inst.calling_ae,
                "origin": inst.origin,
                "path": str(runtime.store.absolute(inst.path)),
                "job_state": job_state,
            }
            for inst, series_uid, study_uid, job_state in rows
        ]


def cmd_instances(args: argparse.Namespace, settings: Settings) -> int:
    """List stored instances (JSON lines with --json)."""
    rows = _instance_rows(settings)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(f"{'SOP Instance UID':<66} {'AE':<16} {'size':>10} job")
        for row in rows:
            print(f"{row['sop_instance_uid']:<66} {row['calling_ae'] or '-':<16} {row['size']:>10} {row['job_state'] or '-'}")
        print(f"{len(rows)} instance(s)")
    return 0


def cmd_studies(args: argparse.Namespace, settings: Settings) -> int:
    """List studies with their study result: final, amended, not-analysed, or pending."""
    with runtime_for(settings) as runtime, runtime.database.read_session() as session:
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
    signer = load_signer(settings.audit.hmac_key_file)
    anchor = AnchorFile(settings.audit_anchor_file)
    with runtime_for(settings) as runtime, runtime.database.read_session() as session:
        result = verify_anchored(session, signer, anchor)
    print(json.dumps({
        "ok": result.ok, "records": result.records, "first_bad_seq": result.first_bad_seq, "problem": result.problem,
        "keyed_from_seq": result.keyed_from_seq, "anchored_seq": result.anchored_seq, "anchor_file": str(anchor.path),
    }))
    if not result.ok:
        print(f"pneumo: audit log NOT intact at record {result.first_bad_seq}: {result.problem}", file=sys.stderr)
    return 0 if result.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pneumo",
        description="Pneumo Gateway: DICOM in, pneumonia classifier, SR / FHIR / HL7 out, audited.",
    )
    default_config = os.environ.get("PNEUMO_CONFIG")
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(default_config) if default_config else None,
        help="TOML settings file (default: $PNEUMO_CONFIG, else ./pneumo.toml if present)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the DICOM node and HTTP server (health, readiness)")
    serve.set_defaults(handler=cmd_serve)

    studies = commands.add_parser("studies", help="list studies and their study results (what the EHR is told)")
    studies.add_argument("--json", action="store_true", help="one JSON object per line")
    studies.set_defaults(handler=cmd_studies)

    instances = commands.add_parser("instances", help="list stored instances")
    instances.add_argument("--json", action="store_true", help="one JSON object per line")
    instances.set_defaults(handler=cmd_instances)

    acceptor = commands.add_parser("acceptor", help=argparse.SUPPRESS)
    acceptor.add_argument("--parent", type=int, required=True)
    acceptor.set_defaults(handler=cmd_acceptor)

    worker = commands.add_parser("worker", help="run only the job workers (inference and delivery)")
    worker.set_defaults(handler=cmd_worker)

    infer = commands.add_parser("infer", help="classify DICOM files, one JSON line per file")
    infer.add_argument("files", nargs="+", type=Path, metavar="FILE.dcm")
    infer.add_argument("--model", type=Path, default=None, help="model package directory (default: configured/bundled)")
    infer.set_defaults(handler=cmd_infer)

    model = commands.add_parser("model", help="model package tools")
    model_commands = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    info = model_commands.add_parser("info", help="print the manifest and verify the ONNX hash")
    info.add_argument("--model", type=Path, default=None)
    info.set_defaults(handler=cmd_model_info)
    train = model_commands.add_parser("train", help="train EfficientNet-B0 (train extra); options: pneumo model train -- --help")
    train.add_argument("rest", nargs=argparse.REMAINDER)
    train.set_defaults(handler=cmd_model_train)
    export = model_commands.add_parser("export", help="export a checkpoint to ONNX + manifest (train extra)")
    export.add_argument("rest", nargs=argparse.REMAINDER)
    export.set_defaults(handler=cmd_model_export)

    register_deliveries(commands)
    register_fhir(commands)
    register_db(commands)

    audit = commands.add_parser("audit", help="audit log tools")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    verify = audit_commands.add_parser("verify", help="verify the hash chain of the audit log")
    verify.set_defaults(handler=cmd_audit_verify)
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


if __name__ == "__main__":
    sys.exit(main())
