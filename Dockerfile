# A ploy worker image: `docker compose up` runs it against Apache Kafka.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The project first, the examples after: editing an example does not reinstall.
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY connectors ./connectors
COPY schemas ./schemas
RUN pip install .

COPY examples ./examples

RUN useradd --system --uid 10001 --home-dir /app ploy \
    && mkdir -p /var/lib/ploy \
    && chown ploy:ploy /var/lib/ploy
USER ploy
ENV PLOY_STATE_DIR=/var/lib/ploy
VOLUME ["/var/lib/ploy"]

CMD ["ploy", "worker", "examples/order-flow"]
