# Pneumo Gateway runtime image (CPU). Build: docker build -t pneumo-gateway .
# Run:   docker run -p 11112:11112 -p 8080:8080 -v pneumo-data:/var/lib/pneumo \
#          -v $PWD/pneumo.toml:/etc/pneumo/pneumo.toml:ro pneumo-gateway
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY conf conf
COPY storage storage
COPY audit audit
COPY dicom_node dicom_node
COPY fhir_api fhir_api
COPY hl7 hl7
COPY inference inference
COPY gateway gateway
RUN python -m pip install --no-cache-dir --upgrade pip \
 && python -m pip wheel --no-cache-dir --wheel-dir /wheels -c constraints.txt .

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --home-dir /var/lib/pneumo pneumo \
 && mkdir -p /var/lib/pneumo /etc/pneumo && chown pneumo /var/lib/pneumo
COPY --from=build /wheels /wheels
RUN python -m pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER pneumo
WORKDIR /var/lib/pneumo
ENV PNEUMO_DATA_DIR=/var/lib/pneumo \
    PNEUMO_FHIR__BIND=0.0.0.0 \
    PNEUMO_DICOM__BIND=0.0.0.0 \
    PNEUMO_LOG__FORMAT=json \
    PNEUMO_CONFIG=/etc/pneumo/pneumo.toml
EXPOSE 11112 8080
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/health').status == 200 else 1)"
ENTRYPOINT ["pneumo"]
CMD ["serve"]
