#!/usr/bin/env bash
# SGLang with cacheservice as its HiCache L3 storage backend (connectors/sglang.py).
#
#   pip install -e /path/to/cacheservice         # makes `connectors.sglang` importable
#   cacheservice serve --port 8642 &             # one service per host, shared by all engines
#   MODEL=Qwen/Qwen3-8B TP=2 bash examples/sglang_launch.sh
#
# Extra-config keys read by the backend (besides SGLang's backend_name/module_path/class_name):
#   url        service URL, http://host:port or unix:///path.sock    (default http://127.0.0.1:8642)
#   token      bearer token when the service has one (or leave it out)
#   timeout    seconds per service call; a slower answer is a miss   (default 2.0)
#   salt       extra namespace salt, e.g. a tenant id                (default "")
#   model      namespace model name when SGLang's model_name is empty
#   zero_copy  "auto" (map the service's shared-memory arena when it is on this host),
#              "on" (require it) or "off" (pages travel in HTTP bodies)
#   interface_v1  1: SGLang's zero-copy batch_get_v1/batch_set_v1 path (recommended)
set -euo pipefail

MODEL="${MODEL:-Qwen/Qwen3-8B}"
TP="${TP:-1}"
CACHESERVICE_URL="${CACHESERVICE_URL:-http://127.0.0.1:8642}"

exec python -m sglang.launch_server \
  --model-path "$MODEL" \
  --tp-size "$TP" \
  --page-size 64 \
  --enable-hierarchical-cache \
  --hicache-ratio 2 \
  --hicache-mem-layout page_first \
  --hicache-io-backend kernel \
  --hicache-write-policy write_through \
  --hicache-storage-prefetch-policy timeout \
  --hicache-storage-backend dynamic \
  --hicache-storage-backend-extra-config "{
    \"backend_name\": \"cacheservice\",
    \"module_path\": \"connectors.sglang\",
    \"class_name\": \"CacheServiceHiCacheStorage\",
    \"interface_v1\": 1,
    \"url\": \"${CACHESERVICE_URL}\",
    \"zero_copy\": \"auto\"
  }"
