# shellcheck shell=bash
# Sourced by scripts/bench-cluster and scripts/bench-breakdown, from the
# repository's root: builds relayrate, makes a work dir that goes at exit
# with the nodes started in it, writes a policy that counts every
# connection and refuses none (the cost of a decision, not of a refusal),
# and starts nodes on loopback, sharing one cluster secret. A node's peer
# port is its client port + 10 (relayrate's default): join through that.

cargo build --release --quiet --bin relayrate
bin=${CARGO_TARGET_DIR:-target}/release/relayrate
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/cluster-secret"

cat > "$work/policy.txt" <<'POLICY'
CHECK_CONN_RATE YES
CHECK_OPEN_CONNECTIONS YES
ConnRate:default 1m
ConnOpen:default 1m
POLICY

wait_serving() { # port
  for _ in $(seq 1 200); do
    if "$bin" bench --target "http://127.0.0.1:$1" --duration 1 --concurrency 1 --keys 1 --json 2>/dev/null \
       | grep -q '"errors":0'; then return 0; fi
    sleep 0.1
  done
  echo "node on port $1 did not serve" >&2; return 1
}

start_node() { # id port extra...
  local id=$1 port=$2; shift 2
  RELAYRATE_LOG=warn "$bin" node --id "$id" --listen "127.0.0.1:$port" \
    --data-dir "$work/n$id-$port" --policy "$work/policy.txt" \
    --cluster-secret-file "$work/cluster-secret" "$@" > "$work/n$id-$port.log" 2>&1 &
  pids+=($!)
}
