# A GPU worker: CUDA torch from the PyTorch image, transformers, peft and bitsandbytes.
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY workers ./workers
COPY migrations ./migrations
# Keep the image's CUDA torch: pinned as a constraint, a dependency that wants another torch
# fails the build here, rather than pip swapping in a build for a CUDA the host driver may lack.
RUN python -c 'from importlib.metadata import version; print("torch==" + version("torch"))' > /tmp/keep-torch.txt \
    && pip install --constraint /tmp/keep-torch.txt ".[worker,cuda]" && useradd --create-home --uid 10001 gemma \
    && mkdir -p /data /models /storage && chown gemma /data /models /storage
USER gemma
CMD ["gemma-jobs", "worker", "--gpu", "0"]
