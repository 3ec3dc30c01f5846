# The image compose.yaml builds: the package and its console script, nothing else.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY domain domain
COPY application application
COPY projections projections
COPY adapters adapters
COPY api api
COPY migrations migrations
RUN pip install --no-cache-dir .
USER nobody
CMD ["echotransact", "serve"]
