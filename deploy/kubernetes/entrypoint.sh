#!/bin/sh
# relayrate-entrypoint: starts one pod of the relayrate StatefulSet, a node
# and its milter (`relayrate run`), with its id and addresses taken from
# the pod's name. Extra arguments are passed on to `relayrate run`.
#
# Environment:
#   RELAYRATE_POD_NAME     the pod's name, NAME-ORDINAL (default: $HOSTNAME)
#   RELAYRATE_PEER         where the other nodes reach the peer listener (the
#                          Raft service) of the pod of ordinal {ordinal}, e.g.
#                          relayrate-{ordinal}.relayrate-peers.NS.svc.cluster.local:7460;
#                          it is this pod's --advertise and the others' --join
#   RELAYRATE_CLIENT       where the pod of ordinal {ordinal} serves clients
#                          (Admin, health), which relayratectl asks (default:
#                          RELAYRATE_PEER's host with RELAYRATE_LISTEN's port)
#   RELAYRATE_LISTEN       client gRPC address to bind: Limiter, Admin, health
#                          (default 0.0.0.0:7450)
#   RELAYRATE_PEER_LISTEN  peer gRPC address to bind (default 0.0.0.0:7460)
#   RELAYRATE_CLUSTER_SECRET_FILE  the secret every node of the cluster shares
#                          (default /etc/relayrate-secret/cluster-secret, the
#                          mounted Secret relayrate-cluster-secret); required
#   RELAYRATE_ADMIN_TOKEN_FILE  the admin token, if the cluster has one: passed
#                          as --admin-token-file (relayratectl reads it too)
#   RELAYRATE_MILTER_LISTEN  milter socket (default inet:127.0.0.1:8894)
#   RELAYRATE_METRICS_LISTEN Prometheus /metrics (default 0.0.0.0:9450)
#   RELAYRATE_DATA_DIR     sled data (default /var/lib/relayrate)
#   RELAYRATE_POLICY       policy file (default /etc/relayrate/ze-policy.txt)
#   RELAYRATE_BIN, RELAYRATECTL  the binaries (default /usr/local/bin/...)
# {ordinal} may appear in the addresses and RELAYRATE_DATA_DIR too, so
# that several "pods" can run on one host (tests/entrypoint.rs).
#
# The node's id is ordinal + 1 (ids start at 1: 0 means "no leader" in
# the Admin API). With an empty data dir, pod 0 creates the cluster and
# the others join it through the pods before them; with data, every pod rejoins as the
# member its data says it is, and --join is ignored by the node.
set -eu

bin=${RELAYRATE_BIN:-/usr/local/bin/relayrate}
ctl=${RELAYRATECTL:-/usr/local/bin/relayratectl}
# Container runtimes set HOSTNAME to the pod's name.
# shellcheck disable=SC3028
pod=${RELAYRATE_POD_NAME:-${HOSTNAME:-}}
peer_template=${RELAYRATE_PEER:-}
listen_template=${RELAYRATE_LISTEN:-0.0.0.0:7450}
secret=${RELAYRATE_CLUSTER_SECRET_FILE:-/etc/relayrate-secret/cluster-secret}
token=${RELAYRATE_ADMIN_TOKEN_FILE:-}

if [ -z "$peer_template" ]; then
    echo "relayrate-entrypoint: RELAYRATE_PEER must say where the peer listener of the pod of ordinal {ordinal} is reached" >&2
    exit 64
fi
# The same host, the client port: where relayratectl asks another pod.
client_template=${RELAYRATE_CLIENT:-${peer_template%:*}:${listen_template##*:}}
# Without the shared secret the node would make up one of its own and no
# other pod could talk to it.
if [ ! -r "$secret" ]; then
    echo "relayrate-entrypoint: no cluster secret at $secret (RELAYRATE_CLUSTER_SECRET_FILE): create the Secret relayrate-cluster-secret (deploy/README.md)" >&2
    exit 64
fi
if [ -n "$token" ] && [ ! -r "$token" ]; then
    echo "relayrate-entrypoint: no admin token at $token (RELAYRATE_ADMIN_TOKEN_FILE)" >&2
    exit 64
fi
ordinal=${pod##*-}
case $ordinal in
'' | *[!0-9]*)
    echo "relayrate-entrypoint: no ordinal at the end of the pod name '$pod'" >&2
    exit 64
    ;;
esac
id=$((ordinal + 1))

# fill TEMPLATE N: TEMPLATE with every {ordinal} replaced by N.
fill() {
    printf '%s' "$1" | sed "s/{ordinal}/$2/g"
}
data=$(fill "${RELAYRATE_DATA_DIR:-/var/lib/relayrate}" "$ordinal")

# Whether the data dir holds no state (a new volume may hold lost+found).
empty_data() {
    for f in "$data"/* "$data"/.[!.]* "$data"/..?*; do
        [ -e "$f" ] || continue
        [ "${f##*/}" = lost+found ] || return 1
    done
}

# A pod removed from the cluster by a scale-down (prestop.sh) leaves this
# mark: its data belongs to a member that no longer exists. If the
# StatefulSet grows again, the pod starts afresh and joins as a new member.
if [ -e "$data/removed-from-cluster" ]; then
    echo "relayrate-entrypoint: node $id was removed from the cluster; clearing $data to join again" >&2
    find "$data" -mindepth 1 -maxdepth 1 ! -name lost+found -exec rm -rf {} +
fi

# Whether the pod of ordinal $1 is a member of a running cluster (asked
# on its client port: the peer port serves only the Raft service).
in_cluster() {
    [ -x "$ctl" ] || return 1
    "$ctl" --node "http://$(fill "$client_template" "$1")" --timeout-secs 3 status --json 2>/dev/null |
        grep -q '"voter":true'
}

# Seeds to join through (their peer addresses): every lower ordinal, pod 0
# first, so that a new pod joins even while pod 0 is down.
join=
n=0
while [ "$n" -lt "$ordinal" ]; do
    join=${join:+$join,}$(fill "$peer_template" "$n")
    n=$((n + 1))
done
if [ "$ordinal" -eq 0 ] && empty_data && in_cluster 1; then
    # Pod 0 lost its volume while the others run: creating a cluster now
    # would make a second one under the same names. Join the running one.
    echo "relayrate-entrypoint: pod 0 has no data but pod 1 is in a cluster: joining it" >&2
    join=$(fill "$peer_template" 1)
fi

set -- run \
    --id "$id" \
    --listen "$(fill "$listen_template" "$ordinal")" \
    --peer-listen "$(fill "${RELAYRATE_PEER_LISTEN:-0.0.0.0:7460}" "$ordinal")" \
    --advertise "$(fill "$peer_template" "$ordinal")" \
    --cluster-secret-file "$secret" \
    ${token:+--admin-token-file "$token"} \
    --data-dir "$data" \
    --policy "${RELAYRATE_POLICY:-/etc/relayrate/ze-policy.txt}" \
    --milter-listen "$(fill "${RELAYRATE_MILTER_LISTEN:-inet:127.0.0.1:8894}" "$ordinal")" \
    --metrics-listen "$(fill "${RELAYRATE_METRICS_LISTEN:-0.0.0.0:9450}" "$ordinal")" \
    ${join:+--join "$join"} \
    "$@"
echo "relayrate-entrypoint: $bin $*" >&2
# exec: the node is PID 1 and receives the kubelet's SIGTERM itself.
exec "$bin" "$@"
