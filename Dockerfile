# The operator image: `cadenza operator` (kopf + engine in one process). The chart also
# runs its `helm test` with it (`cadenza run` against the release's NATS), so it carries
# the whole CLI. Build from the repository root:  docker build -t cadenza:dev .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    # The root file system is read-only in the chart: anything wanting a home gets /tmp.
    HOME=/tmp

WORKDIR /src
COPY pyproject.toml ./
COPY agent-sdk ./agent-sdk
COPY operator ./operator
# pyproject names README.md as the long description; the image does not need its text.
RUN touch README.md \
    && pip install . \
    && cd / && rm -rf /src

WORKDIR /
# The distroless "nonroot" uid: the chart's securityContext runs it as non-root anyway.
USER 65532:65532
CMD ["cadenza", "operator"]
