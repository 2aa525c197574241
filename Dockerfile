# The streambill processors as a container image (used by docker-compose.yml and deploy/k8s).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY streams ./streams
COPY schemas ./schemas
COPY deploy ./deploy
RUN pip install --no-cache-dir -e .
ENV STREAMBILL_HOME=/data
VOLUME ["/data"]
ENTRYPOINT ["streambill"]
