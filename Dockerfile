# The governed worker as a container: `docker run -e PREFECT_API_URL=... image --pool governed`.
# The embedded Rego engine and the default policies are inside; point the pool's
# `engine` job variable at a governance-policy-engine block to use an OPA sidecar.
FROM python:3.11-slim

WORKDIR /opt/prefect-governance
COPY pyproject.toml README.md ./
COPY prefect_governance ./prefect_governance
COPY policies ./policies
COPY blocks ./blocks
COPY examples ./examples

RUN pip install --no-cache-dir '.[postgres]' \
    && useradd --create-home --uid 10001 prefect

USER prefect
ENV PREFECT_HOME=/home/prefect/.prefect \
    PYTHONUNBUFFERED=1

HEALTHCHECK CMD python -c "import prefect_governance" || exit 1
ENTRYPOINT ["prefect", "worker", "start", "--type", "governed-process"]
CMD ["--pool", "governed"]
