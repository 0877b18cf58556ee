#!/usr/bin/env bash
# Start the EPD cluster on the tiny built-in LLaVA, send one image request, print the reply,
# and stop the cluster. Pass --keep to leave the cluster running (Ctrl-C stops it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PORT=${HTTP_PORT:-8000}
bash launch/agg_multimodal.sh --http-port "$PORT" &
cluster=$!
trap 'kill -TERM $cluster 2>/dev/null; wait $cluster 2>/dev/null || true' EXIT
python -m epdserve.tools.wait --model "http://127.0.0.1:$PORT" tiny-llava --timeout 600
python examples/sample_request.py --base-url "http://127.0.0.1:$PORT"
if [ "${1:-}" = "--keep" ]; then
  echo "serving at http://127.0.0.1:$PORT/v1 (Ctrl-C to stop)"
  wait $cluster
fi
