# vllm-jd on NVIDIA GPUs (A100/H100): the official vLLM OpenAI image plus this plugin.
#   docker build -t vllm-jd .
#   docker run --gpus all -p 8000:8000 -v $PWD/models:/models -v $PWD/store:/store vllm-jd \
#       serve /models/Mistral-7B-v0.1 --jd-store /store
# The base image's vLLM must equal the version vllm_jd.serving.patch supports (tests/test_docker.py).
FROM vllm/vllm-openai:v0.32.0

WORKDIR /opt/vllm-jd
COPY pyproject.toml README.md ./
COPY vllm_jd ./vllm_jd
# --no-deps: torch, vllm, safetensors, pydantic, tqdm and numpy come with the image; reinstalling
# them from PyPI could replace the image's CUDA build of torch.
RUN python3 -m pip install --no-cache-dir --no-deps . \
    && python3 -c "import vllm, vllm_jd.serving.patch as p; assert vllm.__version__.startswith(p.SUPPORTED_VLLM), vllm.__version__"

WORKDIR /
EXPOSE 8000
ENTRYPOINT ["vllm-jd"]
CMD ["--help"]
