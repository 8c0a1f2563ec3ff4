# The gateway (also `migrate`, `keys`, `status`, `reaper`): no torch, no model weights.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY workers ./workers
COPY migrations ./migrations
# /models too, owned as in the worker image: whichever container mounts the empty volume first
# gives it its owner, and the workers write the converted model there.
RUN pip install . && useradd --create-home --uid 10001 gemma && mkdir -p /data /models /storage \
    && chown gemma /data /models /storage
USER gemma
EXPOSE 8000
CMD ["gemma-jobs", "gateway", "--host", "0.0.0.0", "--port", "8000"]
