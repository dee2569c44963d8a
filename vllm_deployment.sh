#!/usr/bin/env bash
# Serve a model with vLLM's own OpenAI-compatible server (CUDA GPU only; on CPU use openai_api.py).
#   MODEL=outputs-merged bash vllm_deployment.sh                               # a merged model
#   MODEL=Qwen/Qwen2.5-7B-Instruct LORA=outputs-sft bash vllm_deployment.sh    # base + LoRA adapter
# Clients ask for model "$MODEL_NAME" (with LORA: the adapter; "$MODEL_NAME-base" is the bare base).
# Extra arguments go to vLLM, e.g. --max-model-len 4096 --gpu-memory-utilization 0.9 --quantization awq.
set -euo pipefail
cd "$(dirname "$0")"

MODEL=${MODEL:-outputs-merged}             # hub name or local path (merge_peft_adapter.py writes merged models)
LORA=${LORA:-}                             # a LoRA adapter directory; empty = serve MODEL as it is
MODEL_NAME=${MODEL_NAME:-medicalgpt}       # the model id clients ask for
TP_SIZE=${TP_SIZE:-1}                      # tensor parallelism: GPUs per model
HOST=${HOST:-127.0.0.1}                    # 0.0.0.0 exposes the server: set API_KEY too
PORT=${PORT:-8000}
API_KEY=${API_KEY:-}                       # clients then send Authorization: Bearer $API_KEY
PYTHON=${PYTHON:-python}

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "error: no NVIDIA GPU (nvidia-smi missing or failing); vLLM needs one. On CPU: python openai_api.py" >&2
    exit 2
fi
if ! "$PYTHON" -c "import vllm" >/dev/null 2>&1; then
    echo "error: vllm is not installed for $PYTHON: pip install vllm (GPU machine), or use python openai_api.py" >&2
    exit 2
fi

if [ -n "$LORA" ]; then
    names=(--served-model-name "$MODEL_NAME-base" --enable-lora --lora-modules "$MODEL_NAME=$LORA")
else
    names=(--served-model-name "$MODEL_NAME")
fi
# The key goes through the environment, not the command line that `ps` shows.
if [ -n "$API_KEY" ]; then export VLLM_API_KEY="$API_KEY"; fi

exec "$PYTHON" -m vllm.entrypoints.openai.api_server --model "$MODEL" --tensor-parallel-size "$TP_SIZE" \
    --host "$HOST" --port "$PORT" "${names[@]}" "$@"
