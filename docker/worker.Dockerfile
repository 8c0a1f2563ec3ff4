# A GPU worker: CUDA torch from the PyTorch image, transformers, peft and bitsandbytes.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY workers ./workers
COPY migrations ./migrations
# The image's CUDA torch already satisfies the worker extra's torch>=2.4: pip keeps it.
RUN pip install ".[worker,cuda]" && useradd --create-home --uid 10001 gemma \
    && mkdir -p /data /models /storage && chown gemma /data /models /storage
USER gemma
CMD ["gemma-jobs", "worker", "--gpu", "0"]
