# Shared machinery of the launch scripts: arguments, infrastructure, children, shutdown.
# Sourced by launch/<topology>.sh; the launch-script contract is in README.md ("Running a cluster").

PYTHON=${PYTHON:-python}
ETCD_ENDPOINTS=${ETCD_ENDPOINTS:-http://127.0.0.1:2379}
NATS_SERVER=${NATS_SERVER:-nats://127.0.0.1:4222}
HTTP_HOST=${HTTP_HOST:-0.0.0.0}
EPDSERVE_CACHE=${EPDSERVE_CACHE:-$HOME/.cache/epdserve}
export ETCD_ENDPOINTS NATS_SERVER

MODEL=""
HTTP_PORT=8000
NAMESPACE=epdserve
SERVED_NAME=""
ENCODE_WORKERS=1
PREFILL_WORKERS=1
DECODE_WORKERS=1
EC_STORAGE_PATH=""
HEAD_NODE=0
EXTRA_ARGS=()
CHILDREN=()
ESSENTIAL=()   # etcd/NATS supervisor and frontend: the cluster stops when one of them exits
OWNED_DIRS=()  # directories this script created; removed when it stops

# parse_args "$@": --model, --http-port, --namespace, --served-model-name, --encode-workers,
# --prefill-workers, --decode-workers, --ec-storage-path, --head-node; the rest goes to every
# worker.
parse_args() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --model) MODEL=$2; shift 2 ;;
      --encode-workers) ENCODE_WORKERS=$2; shift 2 ;;
      --prefill-workers) PREFILL_WORKERS=$2; shift 2 ;;
      --decode-workers) DECODE_WORKERS=$2; shift 2 ;;
      --ec-storage-path) EC_STORAGE_PATH=$2; shift 2 ;;
      --head-node) HEAD_NODE=1; shift ;;
      --http-port) HTTP_PORT=$2; shift 2 ;;
      --namespace) NAMESPACE=$2; shift 2 ;;
      --served-model-name) SERVED_NAME=$2; shift 2 ;;
      -h|--help) sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
      *) EXTRA_ARGS+=("$1"); shift ;;
    esac
  done
}

# ensure_model FAMILY: without --model, build (once, cached) a tiny random-weight model.
ensure_model() {
  local family=$1
  if [ -z "$MODEL" ]; then
    MODEL="$EPDSERVE_CACHE/tiny-$family"
    SERVED_NAME=${SERVED_NAME:-tiny-$family}
    if [ ! -f "$MODEL/config.json" ]; then
      echo "epdserve: building the tiny $family model in $MODEL" >&2
      local tmp="$MODEL.tmp.$$"
      # Another script (the other node of a two-node cluster on one machine) may build it at
      # the same time: whichever renames first wins, and both use its model.
      "$PYTHON" -m epdserve.tools.tiny_model --family "$family" --out "$tmp" \
        && { mv -T "$tmp" "$MODEL" 2>/dev/null || [ -f "$MODEL/config.json" ]; } \
        || { rm -rf "$tmp"; echo "epdserve: building the tiny model failed" >&2; exit 1; }
      rm -rf "$tmp"
    fi
  fi
  SERVED_NAME=${SERVED_NAME:-$MODEL}
}

# worker CMD_FLAGS...: start one worker with the flags every worker of this cluster gets.
worker() {
  local storage=()
  [ -n "$EC_STORAGE_PATH" ] && storage=(--ec-storage-path "$EC_STORAGE_PATH")
  spawn "$PYTHON" -m epdserve.worker "$@" --model "$MODEL" --served-model-name "$SERVED_NAME" \
    --namespace "$NAMESPACE" "${storage[@]}" "${EXTRA_ARGS[@]}"
}

# ensure_ec_storage: without --ec-storage-path, an embedding cache directory of this run only.
ensure_ec_storage() {
  if [ -z "$EC_STORAGE_PATH" ]; then
    EC_STORAGE_PATH=$(mktemp -d "${TMPDIR:-/tmp}/epdserve-ec-XXXXXX")
    OWNED_DIRS+=("$EC_STORAGE_PATH")
  fi
}

# workers COUNT CMD_FLAGS...: start COUNT workers with the same flags.
workers() {
  local count=$1 i
  shift
  for i in $(seq 1 "$count"); do worker "$@"; done
}

# spawn CMD...: start a child in its own process group and remember its PID.
spawn() {
  setsid "$@" &
  CHILDREN+=($!)
}

# signal_and_wait SIGNAL SECONDS PID...: signal each process group, wait until all are gone.
signal_and_wait() {
  local sig=$1 secs=$2 pid
  shift 2
  for pid in "$@"; do kill "-$sig" -- "-$pid" 2>/dev/null || kill "-$sig" "$pid" 2>/dev/null; done
  for _ in $(seq 1 $((secs * 10))); do
    local alive=0
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && return 0
    sleep 0.1
  done
  return 1
}

# stop_children: components first (they deregister and drain through etcd/NATS), infra last.
stop_children() {
  trap - INT TERM EXIT
  set +e   # best effort: a child that is already gone must not abort the cleanup
  local infra=${ESSENTIAL[0]:-} components=() pid
  for pid in "${CHILDREN[@]}"; do [ "$pid" != "$infra" ] && components+=("$pid"); done
  [ ${#components[@]} -gt 0 ] && { signal_and_wait TERM 40 "${components[@]}" || signal_and_wait KILL 5 "${components[@]}"; }
  [ -n "$infra" ] && { signal_and_wait TERM 10 "$infra" || signal_and_wait KILL 5 "$infra"; }
  local dir
  for dir in "${OWNED_DIRS[@]}"; do rm -rf -- "$dir"; done
}

# stop_children_on_exit: whatever ends this script stops every child it started.
stop_children_on_exit() {
  trap 'stop_children; exit 130' INT
  trap 'stop_children; exit 143' TERM
  trap 'stop_children' EXIT
}

# start_infra: etcd and NATS from the pip-installed binaries, unless something answers already.
start_infra() {
  stop_children_on_exit
  local workdir="${TMPDIR:-/tmp}/epdserve-infra-$$"
  spawn "$PYTHON" -m epdserve.runtime.services --etcd-endpoints "$ETCD_ENDPOINTS" \
    --nats-server "$NATS_SERVER" --workdir "$workdir"
  ESSENTIAL+=($!)
  "$PYTHON" -m epdserve.tools.wait --tcp "$ETCD_ENDPOINTS" --tcp "$NATS_SERVER" --timeout 60 \
    || { echo "epdserve: etcd/NATS did not come up" >&2; exit 1; }
}

# join_infra: a node without etcd/NATS of its own: wait for the head node's.
join_infra() {
  stop_children_on_exit
  "$PYTHON" -m epdserve.tools.wait --tcp "$ETCD_ENDPOINTS" --tcp "$NATS_SERVER" --timeout 60 \
    || { echo "epdserve: no etcd/NATS at $ETCD_ENDPOINTS / $NATS_SERVER (the head node's)" >&2; exit 1; }
}

start_frontend() {
  spawn "$PYTHON" -m epdserve.frontend --http-host "$HTTP_HOST" --http-port "$HTTP_PORT" --namespace "$NAMESPACE"
  ESSENTIAL+=($!)
}

# run_until_stopped: until the model is served, any component exiting is fatal (bad flags, a
# model that does not load); after that, run until SIGINT/SIGTERM or until the frontend or the
# etcd/NATS supervisor exits. A worker that dies later leaves its lease to expire, so routing
# drops it, as in a real deployment; the rest keeps serving.
run_until_stopped() {
  local url="http://127.0.0.1:$HTTP_PORT" pid
  until "$PYTHON" -m epdserve.tools.wait --model "$url" "$SERVED_NAME" --timeout 1 2>/dev/null; do
    for pid in "${CHILDREN[@]}"; do
      if ! kill -0 "$pid" 2>/dev/null; then
        echo "epdserve: a component exited during start-up; stopping the cluster" >&2
        exit 1
      fi
    done
  done
  echo "epdserve: ready at $url/v1 serving '$SERVED_NAME'" >&2
  local rc=0
  wait -n "${ESSENTIAL[@]}" || rc=$?
  echo "epdserve: the frontend or etcd/NATS exited (status $rc); stopping the cluster" >&2
  exit $(( rc == 0 ? 1 : rc ))
}

# run_workers_until_stopped: a node that serves through another node's frontend: run until
# SIGINT/SIGTERM, or until every worker has exited.
run_workers_until_stopped() {
  echo "epdserve: workers started, registered through $ETCD_ENDPOINTS" >&2
  wait
  echo "epdserve: every worker exited; stopping" >&2
  exit 1
}
