"""The one settings object of a Pneumo Gateway process.

Read from a TOML file (``pneumo.toml`` by default) with ``PNEUMO_*`` environment variables on top
(nested keys with ``__``: ``PNEUMO_DICOM__PORT=11112``). Built once by the CLI and passed down
explicitly: nothing in the code base reads the environment or the file on its own.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from conf.tls import TlsSettings, normalise_fingerprint

DEFAULT_CONFIG_FILE = Path("pneumo.toml")


class _Section(BaseModel):
    """Sections reject unknown keys so that a typo in the TOML file fails loudly at start."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _ae_title(value: str) -> str:
    """PS3.5 §6.2: AE titles are 1-16 characters of the default repertoire, no backslash."""
    stripped = value.strip()
    if not 1 <= len(stripped) <= 16 or "\\" in stripped or not stripped.isascii():
        raise ValueError(f"not a valid AE title: {value!r}")
    return stripped


def _fingerprint(value: str | None) -> str | None:
    return None if value is None else normalise_fingerprint(value)


#: The DIMSE services a peer may be granted (``dicom.peers[].permissions``).
DicomService = Literal["echo", "store", "find", "move", "get"]


class DicomPeer(_Section):
    """A remote application entity allowed to associate with us (and a C-MOVE destination)."""

    ae_title: str
    host: str | None = Field(
        default=None,
        description="Host name or IP the peer connects from; None accepts the AE title from any host.",
    )
    port: int | None = Field(default=None, ge=1, le=65535)
    permissions: list[DicomService] = Field(
        default_factory=lambda: list[DicomService](["echo", "store"]),
        description="DIMSE services this peer may request. The default is what a PACS pushing images "
        "needs; query (find) and retrieve (move, get) must be granted explicitly.",
    )

    certificate_sha256: str | None = Field(
        default=None,
        description="With [dicom.tls]: SHA-256 fingerprint of the client certificate this peer must present "
        "(certificate mapped to the peer); None: any certificate the CA signed.",
    )

    _check_ae = field_validator("ae_title")(_ae_title)
    _check_fingerprint = field_validator("certificate_sha256")(_fingerprint)


class DicomDestination(_Section):
    """A Storage SCP that receives the reports we create (used by the results workflow)."""

    name: str
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = Field(default=False, description="Connect with TLS ([dicom.tls]: CA to verify it, our client certificate).")

    _check_ae = field_validator("ae_title")(_ae_title)


class DicomSettings(_Section):
    ae_title: str = "PNEUMO"
    bind: str = "0.0.0.0"
    port: int = Field(default=11112, ge=0, le=65535)
    peers: list[DicomPeer] = Field(default_factory=list)
    destinations: list[DicomDestination] = Field(default_factory=list)
    max_associations: int = Field(default=32, ge=1, description="Per acceptor process.")
    max_associations_per_host: int = Field(
        default=16,
        ge=0,
        description="Per acceptor process: concurrent associations from one address (0 = no limit). One more is "
        "rejected A-ASSOCIATE-RJ rejected-transient, local-limit-exceeded (PS3.8 Table 9-21) and alerted.",
    )
    max_dataset_bytes: int = Field(
        default=1024 * 2**20,
        ge=0,
        description="Largest C-STORE data set accepted (bytes, 0 = no limit). A larger one is discarded as it "
        "arrives and answered 0xA700 Refused: Out of Resources (PS3.4 B.2.3), and alerted.",
    )
    acceptor_processes: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Processes accepting associations on the port (Linux SO_REUSEPORT). Python "
        "receives PDUs under one GIL per process; on N cores, N processes ingest ~N times faster.",
    )
    max_pdu: int = Field(
        default=262144,
        ge=0,
        description="Maximum PDU length we advertise (bytes, 0 = unlimited). Large PDUs cut per-PDU "
        "overhead: the default 16 KiB keeps a Python SCP CPU-bound.",
    )
    require_called_ae_title: bool = True
    on_conflict: Literal["keep", "replace"] = Field(
        default="keep",
        description="Same SOP Instance UID with different bytes: keep the first copy or replace it.",
    )
    acse_timeout: float = 30.0
    association_request_timeout: float = Field(
        default=10.0,
        gt=0,
        description="ARTIM (PS3.8 9.1.5): seconds a new connection has to deliver its complete "
        "A-ASSOCIATE-RQ before it is closed.",
    )
    max_pending_per_host: int = Field(
        default=8,
        ge=1,
        description="Per acceptor process: connections from one address that have not yet sent a complete "
        "A-ASSOCIATE-RQ. A new one beyond this closes that address's oldest.",
    )
    max_pending_connections: int = Field(
        default=64,
        ge=1,
        description="Per acceptor process: connections from all addresses that have not yet sent a complete "
        "A-ASSOCIATE-RQ. A new one beyond this closes the oldest, preferring addresses of no configured peer.",
    )
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    timezone: str | None = Field(
        default=None,
        description="IANA time zone (e.g. 'Europe/Berlin') of the date/times in the SR and summary image "
        "when the source has no Timezone Offset From UTC; None: the system's local zone.",
    )
    tls: TlsSettings = Field(default_factory=TlsSettings, description="DICOM TLS (PS3.15 B.9, BCP 195); docs/security.md.")

    _check_ae = field_validator("ae_title")(_ae_title)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is not None:
            from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError) as exc:
                raise ValueError(f"dicom.timezone: unknown IANA time zone {value!r}") from exc
        return value

    @model_validator(mode="after")
    def _unique_peers(self) -> DicomSettings:
        titles = [p.ae_title for p in self.peers]
        if len(titles) != len(set(titles)):
            raise ValueError("dicom.peers: each ae_title may appear only once")
        names = [d.name for d in self.destinations]
        if len(names) != len(set(names)):
            raise ValueError("dicom.destinations: each name may appear only once")
        return self


class HttpSettings(_Section):
    bind: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)


class FhirAuthSettings(_Section):
    """Who may call the FHIR API (docs/fhir.md, "Security"): SMART Backend Services bearer JWTs."""

    mode: Literal["jwt", "anonymous"] = Field(
        default="jwt",
        description="jwt: every request but /fhir/metadata and the SMART configuration needs a bearer JWT. "
        "anonymous: no token needed; allowed only when [fhir] bind is a loopback address (logged loudly).",
    )
    issuer: str | None = Field(default=None, description="Expected `iss` claim (the hospital's token service).")
    audience: str | None = Field(default=None, description="Expected `aud` claim (this gateway).")
    jwks_file: Path | None = Field(default=None, description="JWK Set file with the RS256/ES256 public keys.")
    jwks_url: str | None = Field(default=None, description="JWK Set URL (fetched and cached) instead of jwks_file.")
    hs256_secret: str = Field(
        default="", description="Shared HS256 secret, for development only (at least 32 characters); empty = off."
    )
    leeway_seconds: float = Field(default=30.0, ge=0, le=300, description="Clock skew allowed on exp/nbf/iat.")
    token_endpoint: str | None = Field(
        default=None, description="Published in /.well-known/smart-configuration (the IdP's token endpoint)."
    )

    @field_validator("hs256_secret")
    @classmethod
    def _secret_long_enough(cls, value: str) -> str:
        if value and len(value) < 32:
            raise ValueError("fhir.auth.hs256_secret must be at least 32 characters (or empty to disable it)")
        return value


class FhirSettings(HttpSettings):
    """The HTTP server of `pneumo serve`: /health, /ready and the FHIR R4 API under /fhir."""

    base_url: str | None = Field(
        default=None,
        description="Public base URL of the FHIR API (e.g. https://pneumo.hospital.example/fhir) used in links "
        "and fullUrls; default: taken from each request.",
    )
    default_count: int = Field(default=20, ge=1, le=1000, description="Page size when a search names no _count.")
    max_count: int = Field(default=200, ge=1, le=1000, description="Largest _count honoured (larger is capped).")
    max_request_bytes: int = Field(
        default=2**20, ge=1024, description="Largest request body under /fhir (bytes); a larger one is answered 413."
    )
    requests_per_second: float = Field(
        default=50.0,
        ge=0,
        description="Sustained /fhir requests per second per client: the token's client id, or the address when "
        "anonymous or when the token is refused (0 = no limit). Beyond it: 429 with Retry-After.",
    )
    request_burst: int = Field(
        default=100, ge=1, description="Requests a client may make at once above the sustained rate (token bucket size)."
    )
    auth: FhirAuthSettings = Field(default_factory=FhirAuthSettings)
    subscription_endpoints: list[str] = Field(
        default_factory=list,
        description="URL prefixes a Subscription's rest-hook endpoint must start with (e.g. https://ehr.hospital.example/); "
        "empty = any http(s) URL. Set it in production: a client allowed to write Subscriptions could otherwise make "
        "the gateway call any address it can reach.",
    )
    tls: TlsSettings = Field(default_factory=TlsSettings, description="HTTPS for /fhir, /health, /ready; docs/security.md.")


class Hl7Peer(_Section):
    """A system allowed to send us orders and ADT (MSH-3/MSH-4, and the host it connects from)."""

    sending_application: str
    sending_facility: str
    host: str | None = Field(default=None, description="Host name or IP it connects from; None = any host.")
    certificate_sha256: str | None = Field(
        default=None,
        description="With [hl7.tls]: SHA-256 fingerprint of the client certificate this sender must present.",
    )

    _check_fingerprint = field_validator("certificate_sha256")(_fingerprint)


class Hl7Destination(_Section):
    """An MLLP receiver of our ORU^R01 results (an EHR's interface engine)."""

    name: str
    host: str
    port: int = Field(ge=1, le=65535)
    receiving_application: str
    receiving_facility: str
    tls: bool = Field(default=False, description="Connect with TLS ([hl7.tls]: CA to verify it, our client certificate).")


class Hl7Settings(_Section):
    """HL7 v2 over MLLP (docs/hl7.md): orders and ADT in, ORU^R01 results out."""

    enabled: bool = Field(default=True, description="Run the MLLP listener in `pneumo serve`.")
    bind: str = "127.0.0.1"
    port: int = Field(default=2575, ge=0, le=65535)
    sending_application: str = "PNEUMO"
    sending_facility: str = "RAD"
    peers: list[Hl7Peer] = Field(default_factory=list)
    destinations: list[Hl7Destination] = Field(default_factory=list)
    max_message_bytes: int = Field(
        default=1_048_576, ge=1024, description="Larger frames are refused (AR) and the connection closed."
    )
    idle_timeout_seconds: float = Field(default=60.0, gt=0, description="A connection silent this long is closed.")
    max_connections: int = Field(default=64, ge=1, description="Concurrent inbound connections.")
    ack_timeout_seconds: float = Field(default=30.0, gt=0, description="How long a result waits for the EHR's ACK.")
    processing_ids: list[Literal["P", "T", "D"]] = Field(
        default_factory=lambda: list[Literal["P", "T", "D"]](["P"]),
        description="MSH-11 values accepted (P production, T training, D debugging); others are rejected (AR). "
        "A test system lists \"T\"; ORU^R01 results carry the first value.",
    )
    tls: TlsSettings = Field(default_factory=TlsSettings, description="MLLP over TLS (IHE ATNA secure node); docs/security.md.")

    @model_validator(mode="after")
    def _unique_names(self) -> Hl7Settings:
        names = [d.name for d in self.destinations]
        if len(names) != len(set(names)):
            raise ValueError("hl7.destinations: each name may appear only once")
        return self


class StorageEncryptionSettings(_Section):
    """Encryption at rest of the DICOM file store (storage/encryption.py; docs/architecture.md).

    Off unless a key is configured. The key comes from a file or, for container secrets passed
    as variables, from ``PNEUMO_STORAGE__ENCRYPTION__KEY``; never from the TOML file itself."""

    key_id: str | None = Field(
        default=None,
        description="Id of the current key, written into every new file's header (1-64 of A-Z a-z 0-9 . _ -).",
    )
    key_file: Path | None = Field(
        default=None,
        description="File holding the current AES-256 key: 64 hex digits (`openssl rand -hex 32`, "
        "`pneumo keys generate`) or base64 of 32 bytes (`openssl rand -base64 32`).",
    )
    key: SecretStr | None = Field(
        default=None,
        description="The current key itself (hex or base64), for PNEUMO_STORAGE__ENCRYPTION__KEY; "
        "use key_file or this, not both.",
    )
    retired_key_files: dict[str, Path] = Field(
        default_factory=dict,
        description="Older keys, key id -> key file: read only, so files written under them stay readable "
        "until `pneumo keys rotate` re-encrypts them under the current key.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> StorageEncryptionSettings:
        if self.key_file is not None and self.key is not None:
            raise ValueError("storage.encryption: give key_file or key, not both")
        if (self.key_file is not None or self.key is not None) and not self.key_id:
            raise ValueError("storage.encryption: key_id is required with a key")
        if self.key_id is not None and self.key_file is None and self.key is None:
            raise ValueError("storage.encryption: key_id is set but neither key_file nor key is")
        if self.key_id is not None and self.key_id in self.retired_key_files:
            raise ValueError("storage.encryption: the current key_id is also listed in retired_key_files")
        return self

    @property
    def enabled(self) -> bool:
        return self.key_id is not None


class StorageSettings(_Section):
    encryption: StorageEncryptionSettings = Field(default_factory=StorageEncryptionSettings)
    fsync: bool = Field(
        default=True,
        description="fsync files and directories before acknowledging; turn off only for throwaway test data.",
    )
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL"
    min_free_mb: int = Field(
        default=100,
        ge=0,
        description=(
            "Free-space floor (MiB) of the file store and its staging area: below it /ready is not ready "
            "and new instances are refused with 0xA700 (PS3.4 B.2.3), leaving room for the database; 0 = off."
        ),
    )


class WorkerSettings(_Section):
    enabled: bool = Field(
        default=True, description="Run the job workers with `pneumo serve` (in its worker processes, or as its threads)."
    )
    threads: int = Field(default=1, ge=0, description="Inference worker threads per worker process.")
    processes: int = Field(
        default=2, ge=0,
        description="Worker processes `pneumo serve` starts and supervises (`pneumo worker` children), so that "
        "results never share a GIL with the DICOM, HL7 and HTTP listeners; 0 runs the workers as threads of the "
        "serve process. Measured on 2 cores (docs/benchmarks.md): 2 processes delivered a 200-radiograph burst's "
        "SRs sooner than 1 or 0.",
    )
    poll_interval: float = Field(default=0.5, gt=0)
    lease_seconds: float = Field(default=300.0, gt=0)
    max_attempts: int = Field(default=5, ge=1)
    publication_wait_seconds: float = Field(
        default=30.0, ge=0,
        description="While images wait for analysis, a study's FHIR publication waits for them, at most this long "
        "past its due time (0: never waits). In a burst the SRs go out first and a study's preliminary and final "
        "publications coalesce; measured in docs/benchmarks.md.",
    )


class DeliverySettings(_Section):
    """Sending our reports to ``dicom.destinations`` (the outbox)."""

    max_attempts: int = Field(
        default=20, ge=1,
        description="Attempts before a delivery is dead-lettered. With the default backoff (2 s doubling, capped "
        "at 300 s, at least half of each step) 20 attempts span at least ~30 minutes of peer downtime.",
    )
    backoff_base_seconds: float = Field(default=2.0, gt=0)
    backoff_cap_seconds: float = Field(default=300.0, gt=0)
    calling_ae_title: str | None = Field(default=None, description="Calling AE for deliveries; default dicom.ae_title.")
    timeout_seconds: float = Field(default=30.0, gt=0)
    association_idle_seconds: float = Field(
        default=5.0, ge=0,
        description="An association to a destination stays open this long after its last C-STORE and carries the "
        "next object this worker process sends there (0: one association per object). Saves ~21 ms and half the "
        "CPU of each report against DCMTK storescp (docs/benchmarks.md).",
    )
    threads: int = Field(
        default=1, ge=1,
        description="Delivery worker threads. More overlap slow peers, but on a small machine they take CPU "
        "from the classifier: measured on 2 cores, 2 threads made the last SR of a 200-study burst 12 s later.",
    )


class InferenceSettings(_Section):
    model_dir: Path | None = Field(default=None, description="Model package directory; default the bundled model.")
    intra_op_threads: int = Field(default=0, ge=0, description="ONNX Runtime threads per inference (0 = ORT default).")
    max_batch: int = Field(default=8, ge=1)
    max_wait_ms: float = Field(default=2.0, ge=0)
    allow_cuda: bool = True
    summary_image: bool = Field(default=True, description="Also produce the Secondary Capture summary image.")
    # Applicability sanity limits (inference/applicability.py): outside them an image is not-applicable.
    min_image_side: int = Field(
        default=224, ge=1, le=65535,
        description="Smallest Rows/Columns accepted: the bundled model's input size, so an image is never enlarged "
        "(the model would judge detail that is not there).",
    )
    max_image_side: int = Field(default=8192, ge=1, le=65535, description="Largest Rows/Columns accepted.")
    max_aspect_ratio: float = Field(default=2.0, ge=1.0, description="Largest longer/shorter side ratio accepted.")
    min_bits_stored: int | None = Field(
        default=None, ge=1, le=16, description="Smallest Bits Stored accepted; default: the model's (bundled: 8)."
    )
    # Intended use (docs/model.md): each key overrides the model's model.json declaration; None = the model's.
    max_bits_stored: int | None = Field(
        default=None, ge=1, le=16, description="Largest Bits Stored accepted; default: the model's (bundled: 16)."
    )
    modalities: list[str] | None = Field(default=None, description="Accepted Modality values; default the model's (CR, DX).")
    body_parts: list[str] | None = Field(default=None, description="Accepted Body Part Examined; default the model's (CHEST).")
    view_positions: list[str] | None = Field(
        default=None, description="Accepted (frontal) View Position values; default the model's (AP, PA)."
    )
    photometric_interpretations: list[str] | None = Field(
        default=None, description="Accepted Photometric Interpretation; default the model's (MONOCHROME1, MONOCHROME2)."
    )
    min_age_years: float | None = Field(
        default=None, ge=0, le=150, description="Youngest accepted age in years (inclusive); default the model's (1)."
    )
    max_age_years: float | None = Field(
        default=None, ge=0, le=150,
        description="Age in years from which images are refused (exclusive); default the model's (6: ages 1-5).",
    )
    unknown_age: Literal["not-analysed", "analyse"] = Field(
        default="not-analysed",
        description="When an age range applies and the header gives no age: do not analyse (default), or analyse.",
    )
    require_single_frame: bool = Field(default=True, description="Refuse multi-frame images.")
    dx_for_presentation_only: bool = Field(default=True, description="Refuse DX images FOR PROCESSING.")
    reject_other_views: bool = Field(
        default=True, description="Refuse a present View Position that is not one of view_positions (e.g. LL)."
    )

    @model_validator(mode="after")
    def _ordered_bounds(self) -> InferenceSettings:
        if self.min_age_years is not None and self.max_age_years is not None and self.min_age_years >= self.max_age_years:
            raise ValueError("inference.min_age_years must be below inference.max_age_years")
        if self.min_bits_stored is not None and self.max_bits_stored is not None and self.min_bits_stored > self.max_bits_stored:
            raise ValueError("inference.min_bits_stored must not exceed inference.max_bits_stored")
        return self


class ResultsSettings(_Section):
    """Study results: what the EHR is told (FHIR DiagnosticReport, HL7 ORU^R01)."""

    study_stable_seconds: float = Field(
        default=10.0,
        ge=0,
        description="Quiet period after a study's last image result before its study result is made. "
        "A modality sends a chest study's images within seconds; 10 s keeps the EHR's wait short "
        "while most studies are reported once, not amended. Late images make an amended result.",
    )


class MonitoringSettings(_Section):
    """Model drift monitoring (docs/model.md, "Model monitoring"): the population stability index of
    recent results' probabilities and input statistics against the model package's reference."""

    drift_window: int = Field(
        default=500, ge=1, description="The newest analysed results of the loaded model version that are compared."
    )
    drift_min_samples: int = Field(
        default=100, ge=1,
        description="Fewer results in the window give no verdict (sampling noise alone makes a small window's PSI large).",
    )
    drift_psi_alert: float = Field(
        default=0.25, gt=0,
        description="PSI above which a feature raises the drift alert (usual reading: <0.1 stable, "
        "0.1-0.25 moderate, >0.25 significant shift).",
    )
    drift_prevalence: float | None = Field(
        default=None, ge=0, le=1,
        description="Expected share of positive (pneumonia) images at this site: the probability's reference is "
        "the model's per-label reference mixed at this prevalence. None: the validation split's mix as it is "
        "(bundled model: 74 % pneumonia, far above a usual intake, so set it).",
    )

    @model_validator(mode="after")
    def _window_holds_min(self) -> MonitoringSettings:
        if self.drift_min_samples > self.drift_window:
            raise ValueError("monitoring.drift_min_samples must not exceed monitoring.drift_window")
        return self


class AuditSyslogSettings(_Section):
    """Forwarding of the audit log to an IHE ATNA Audit Record Repository (ITI-20): RFC 5424
    syslog messages over TLS (RFC 5425), DICOM PS3.15 A.6 (docs/audit.md, ``[audit.syslog]``)."""

    enabled: bool = Field(default=False, description="Forward every audit record from `pneumo serve`.")
    host: str | None = Field(
        default=None, description="The Audit Record Repository's host name (checked against its certificate)."
    )
    port: int = Field(default=6514, ge=1, le=65535, description="syslog over TLS port (RFC 5425 §4.1: 6514).")
    tls: TlsSettings = Field(
        default_factory=TlsSettings,
        description="ca_file: the CA that signs the repository's certificate (None: the system trust store); "
        "cert_file/key_file: our client certificate (ATNA node authentication is mutual).",
    )
    check_hostname: bool = Field(default=True, description="Check that the repository's certificate names `host`.")
    hostname: str | None = Field(
        default=None, description="HOSTNAME of the syslog header (RFC 5424 §6.2.4); default this machine's FQDN."
    )
    app_name: str = Field(default="pneumo-gateway", description="APP-NAME of the syslog header (1-48 printable ASCII).")
    utf8_bom: bool = Field(
        default=False,
        description="Start MSG with the UTF-8 BOM (RFC 5424 §6.4 MSG-UTF8). Off by default: IHE ITI TF-2 §3.20 sends the "
        "XML without it; turn on for a repository that wants strict RFC 5424.",
    )
    batch_size: int = Field(default=100, ge=1, le=10_000, description="Records read and written per round.")
    poll_interval_seconds: float = Field(default=1.0, gt=0, description="How often new records are looked for.")
    connect_timeout_seconds: float = Field(default=10.0, gt=0, description="TCP connect + TLS handshake + write timeout.")
    retry_initial_seconds: float = Field(default=1.0, gt=0, description="First wait after a failure ...")
    retry_max_seconds: float = Field(default=60.0, gt=0, description="... doubling up to this cap while the repository is down.")
    cursor_file: Path | None = Field(
        default=None,
        description="Where the last forwarded sequence number is kept; default <data_dir>/audit-forward.cursor.",
    )
    start_at: Literal["oldest", "newest"] = Field(
        default="oldest",
        description="With no cursor file yet: forward the whole existing log (oldest) or only records from now on (newest).",
    )

    @field_validator("app_name", "hostname")
    @classmethod
    def _printable_ascii(cls, value: str | None, info: Any) -> str | None:
        """RFC 5424 §6: header fields are 1*PRINTUSASCII (%d33-126): APP-NAME up to 48, HOSTNAME up to 255."""
        limit = 48 if info.field_name == "app_name" else 255
        if value is not None and not (1 <= len(value) <= limit and all(33 <= ord(c) <= 126 for c in value)):
            raise ValueError(f"audit.syslog.{info.field_name}: 1-{limit} printable US-ASCII characters, no spaces")
        return value

    @model_validator(mode="after")
    def _usable(self) -> AuditSyslogSettings:
        if self.enabled and not self.host:
            raise ValueError("audit.syslog: enabled needs host (the Audit Record Repository)")
        if self.retry_max_seconds < self.retry_initial_seconds:
            raise ValueError("audit.syslog: retry_max_seconds must be at least retry_initial_seconds")
        return self


class AuditSettings(_Section):
    """Tamper evidence of the audit log beyond its hash chain (docs/configuration.md, ``[audit]``)."""

    hmac_key_file: Path | None = Field(
        default=None,
        description="File holding the HMAC-SHA256 key (at least 32 bytes) that seals every audit record. "
        "Kept out of the database so that write access to it is not enough to re-hash an edited chain. "
        "Every command that writes audit records needs it (serve, worker, db upgrade, db reindex, deliveries "
        "retry, keys rotate, fhir publish, audit export), and so does `audit verify`.",
    )
    retired_hmac_key_files: list[Path] = Field(
        default_factory=list,
        description="Earlier HMAC keys, oldest first, after a key rotation: they only verify the records they "
        "sealed (which must all come before the current key's). docs/security.md, rotation.",
    )
    anchor_file: Path | None = Field(
        default=None,
        description="Append-only file of audit chain-head checkpoints; default <data_dir>/audit-anchor.log.",
    )
    anchor_every: int = Field(default=100, ge=1, description="Checkpoint after this many new records ...")
    anchor_interval_seconds: float = Field(
        default=5.0, gt=0, description="... or this many seconds after the last checkpoint, if the chain grew."
    )
    syslog: AuditSyslogSettings = Field(default_factory=AuditSyslogSettings)


class MetricsSettings(_Section):
    """Prometheus ``/metrics`` on the HTTP port (docs/operations.md, "Metrics")."""

    enabled: bool = Field(
        default=True,
        description="Serve /metrics: counters read from the database at scrape time (cluster-wide: every "
        "worker and acceptor process writes there) and this process's HTTP latencies. Counts and reason "
        "codes only, never patient or study identifiers.",
    )
    max_rows_per_scrape: int = Field(
        default=5000, ge=1,
        description="Rows one scrape reads per table when catching up; a larger backlog is read over "
        "the next scrapes, so a scrape stays cheap after a burst.",
    )


class TracingSettings(_Section):
    """Optional OpenTelemetry tracing: ingest -> analysis -> delivery spans, exported with OTLP/HTTP
    (docs/operations.md, "Tracing"). Needs the ``tracing`` extra (``pip install 'pneumo-gateway[tracing]'``)."""

    enabled: bool = Field(
        default=False,
        description="Export spans (dicom.c-store, inference.analyse, deliver.<channel>). Off: no tracing "
        "code runs and the OpenTelemetry SDK is never imported.",
    )
    otlp_endpoint: str = Field(
        default="http://localhost:4318/v1/traces",
        description="The OTLP/HTTP traces endpoint of a collector (protobuf over HTTP POST).",
    )
    service_name: str = Field(
        default="pneumo-gateway", min_length=1, max_length=128,
        description="OpenTelemetry resource attribute service.name of every span.",
    )
    sample_ratio: float = Field(
        default=1.0, ge=0.0, le=1.0,
        description="Fraction of new traces recorded (parent-based: a worker follows the decision of the "
        "trace it continues).",
    )
    export_timeout_seconds: float = Field(
        default=10.0, gt=0, description="How long one export to the collector may take."
    )


class ConsoleOidcSettings(_Section):
    """Browser sign-in to the console with the hospital's OpenID Connect provider (docs/console.md,
    "Signing in"): the authorization code flow with PKCE (RFC 7636). The access token it returns is
    verified exactly like a FHIR API bearer token (``[fhir.auth]``: issuer, audience, keys)."""

    authorization_endpoint: str | None = Field(
        default=None, description="The IdP's authorization endpoint; unset = no OIDC sign-in."
    )
    token_endpoint: str | None = Field(
        default=None, description="The IdP's token endpoint (default: [fhir.auth] token_endpoint)."
    )
    client_id: str | None = Field(default=None, description="This console's client id at the IdP.")
    client_secret: str = Field(
        default="",
        description="Client secret for a confidential client (client_secret_post); empty = public client with PKCE only.",
    )
    scope: str = Field(
        default="openid pneumo/console.read pneumo/console.operate",
        description="Scopes asked for at sign-in; the token's granted scopes decide the role.",
    )
    redirect_uri: str | None = Field(
        default=None, description="The callback URL registered at the IdP (default: <this server>/console/auth/callback)."
    )


class ConsoleSettings(_Section):
    """The operator console under ``/console`` on the HTTP port (docs/console.md)."""

    enabled: bool = Field(default=True, description="Serve the operator console under /console.")
    read_scope: str = Field(
        default="pneumo/console.read", description="Token scope that lets a user see the console (read-only operator)."
    )
    operate_scope: str = Field(
        default="pneumo/console.operate",
        description="Token scope that also lets a user act (retry dead letters, export the audit log); implies read.",
    )
    dev_login: bool = Field(
        default=False,
        description="A development sign-in form (any name, either role, no password): refused unless [fhir] bind "
        "is a loopback address, and then answered only to loopback clients.",
    )
    session_minutes: int = Field(
        default=480, ge=1, le=1440,
        description="Longest a console session lasts; a session from an OIDC sign-in also ends when its access token expires.",
    )
    page_size: int = Field(default=50, ge=10, le=500, description="Rows per page in the studies, outbox and audit lists.")
    oidc: ConsoleOidcSettings = Field(default_factory=ConsoleOidcSettings)


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "console"] = Field(
        default="auto", description="auto: JSON when stderr is not a terminal."
    )


class Settings(BaseSettings):
    """Everything a process needs to know, validated at start."""

    model_config = SettingsConfigDict(
        env_prefix="PNEUMO_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    data_dir: Path = Path("var")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default sqlite:///<data_dir>/pneumo.db"
    )
    dicom: DicomSettings = Field(default_factory=DicomSettings)
    fhir: FhirSettings = Field(default_factory=FhirSettings)
    hl7: Hl7Settings = Field(default_factory=Hl7Settings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    results: ResultsSettings = Field(default_factory=ResultsSettings)
    monitoring: MonitoringSettings = Field(default_factory=MonitoringSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'pneumo.db').as_posix()}"

    @property
    def dicom_dir(self) -> Path:
        return self.data_dir / "dicom"

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir / "tmp"

    @property
    def wake_dir(self) -> Path:
        """Where worker processes register for cross-process wake-ups (storage/wakeup.py).

        One folder per host: wake-ups are loopback datagrams to PIDs of this host, and workers on
        several hosts may share ``data_dir``; a listener sweeping the registrations of dead PIDs
        must not take another host's live PIDs for dead ones."""
        return self.data_dir / "run" / "wake" / socket.gethostname()

    @property
    def audit_anchor_file(self) -> Path:
        return self.audit.anchor_file or self.data_dir / "audit-anchor.log"

    @property
    def audit_forward_cursor_file(self) -> Path:
        return self.audit.syslog.cursor_file or self.data_dir / "audit-forward.cursor"


def load_settings(
    config_file: Path | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build :class:`Settings` from *config_file* (if given or ``./pneumo.toml`` exists) and env.

    Precedence, highest first: *overrides* (CLI flags), ``PNEUMO_*`` environment, the TOML file,
    defaults. An explicitly named file that does not exist is an error; the implicit default is
    optional so that ``pneumo serve`` runs on embedded defaults in an empty folder.
    """
    if config_file is None:
        config_file = DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None
    elif not config_file.is_file():
        raise FileNotFoundError(f"configuration file not found: {config_file}")

    toml_path = config_file

    class _Configured(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if toml_path is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
            return tuple(sources)

    built = _Configured(**dict(overrides or {}))
    return Settings.model_validate(built.model_dump())
