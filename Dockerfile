# syntax=docker/dockerfile:1
# Pneumo Gateway runtime image (CPU, bundled model). Build: docker build -t pneumo-gateway .
# Run:   docker run -p 11112:11112 -p 8080:8080 -p 2575:2575 -v pneumo-data:/var/lib/pneumo \
#          -v $PWD/pneumo.toml:/etc/pneumo/pneumo.toml:ro pneumo-gateway
# The whole loop with PostgreSQL and Orthanc as the PACS: docker compose up (README, "Containers").

# ---- build: resolve and install into a venv, pinned by the lock file (constraints.txt) ----
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/pneumo
WORKDIR /src
COPY pyproject.toml README.md LICENSE constraints.txt ./
COPY conf conf
COPY storage storage
COPY audit audit
COPY dicom_node dicom_node
COPY fhir_api fhir_api
COPY hl7 hl7
COPY inference inference
COPY gateway gateway
# Every dependency at the version `make lock` pinned; the package itself (with the bundled model as
# package data: pyproject [tool.setuptools.package-data] "*.onnx", "*.json") from this source tree,
# with the tracing extra (OpenTelemetry SDK + OTLP exporter; unused until [tracing] enabled).
RUN /opt/pneumo/bin/pip install --constraint constraints.txt '.[tracing]' \
 && /opt/pneumo/bin/pneumo model info > /dev/null

# ---- runtime: the venv only, no compiler, no source tree, no pip cache; not root ----
FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/pneumo --shell /usr/sbin/nologin pneumo \
 && mkdir -p /var/lib/pneumo /etc/pneumo \
 && chown pneumo:pneumo /var/lib/pneumo
COPY --from=build /opt/pneumo /opt/pneumo
ENV PATH=/opt/pneumo/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PNEUMO_CONFIG=/etc/pneumo/pneumo.toml \
    PNEUMO_DATA_DIR=/var/lib/pneumo \
    PNEUMO_DICOM__BIND=0.0.0.0 \
    PNEUMO_FHIR__BIND=0.0.0.0 \
    PNEUMO_HL7__BIND=0.0.0.0 \
    PNEUMO_LOG__FORMAT=json
# Numeric, so that Kubernetes runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001
WORKDIR /var/lib/pneumo
VOLUME ["/var/lib/pneumo"]
# DICOM (dicom.port), HTTP: /health, /ready, /fhir (fhir.port), HL7 MLLP (hl7.port).
EXPOSE 11112 8080 2575
# `pneumo health` probes /health as configured: http, or https verified against [fhir.tls] ca_file.
HEALTHCHECK --interval=30s --timeout=15s --start-period=60s --retries=3 CMD ["pneumo", "health", "--timeout", "10"]
ENTRYPOINT ["pneumo"]
CMD ["serve"]
