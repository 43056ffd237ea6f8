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
#   RELAYRATE_SCALE_JSON   a file holding the StatefulSet's Scale, read
#                          instead of asking the Kubernetes API (tests)
#   RELAYRATE_ASK_EVERY    seconds between two rounds of questions while
#                          pod 0 waits (default 2)
# {ordinal} may appear in the addresses and RELAYRATE_DATA_DIR too, so
# that several "pods" can run on one host (tests/entrypoint.rs).
#
# The node's id is ordinal + 1 (ids start at 1: 0 means "no leader" in
# the Admin API). With an empty data dir, the others join through the pods
# before them, and pod 0 creates the cluster only once every other pod of
# the StatefulSet has answered that it is in none: if one is in a cluster,
# pod 0 joins it; while one does not answer (it may hold the cluster),
# pod 0 waits. With data, every pod rejoins as the member its data says it
# is, and --join is ignored by the node.
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

# What the pod of ordinal $1 says of itself, asked on its client port
# (the peer port serves only the Raft service): "member" (a voter of a
# cluster, running or not), "none" (it answers and is in no cluster: a new
# pod waiting to join) or "unknown" (no answer).
membership() {
    if [ ! -x "$ctl" ]; then
        echo unknown
        return
    fi
    if ! said=$("$ctl" --node "http://$(fill "$client_template" "$1")" --timeout-secs 3 status --json 2>/dev/null); then
        echo unknown
    elif printf '%s' "$said" | grep -q '"voter":true'; then
        echo member
    else
        echo none
    fi
}

# The StatefulSet's Scale subresource (RBAC: get statefulsets/scale).
scale_json() {
    if [ -n "${RELAYRATE_SCALE_JSON:-}" ]; then
        cat "$RELAYRATE_SCALE_JSON"
        return
    fi
    sa=/var/run/secrets/kubernetes.io/serviceaccount
    curl --silent --show-error --fail --max-time 5 \
        --cacert "$sa/ca.crt" \
        --header "Authorization: Bearer $(cat "$sa/token")" \
        "https://kubernetes.default.svc/apis/apps/v1/namespaces/$(cat "$sa/namespace")/statefulsets/${pod%-*}/scale"
}

# spec.replicas of the Scale read on stdin (left out when 0); fails on
# anything else.
desired_replicas() {
    json=$(tr -d ' \t\r\n')
    case $json in
    *'"kind":"Scale"'*'"spec":{'*) ;;
    *) return 1 ;;
    esac
    spec=$(printf '%s' "$json" | sed -n 's/.*"spec":{\([^}]*\)}.*/\1/p')
    n=$(printf '%s' "$spec" | sed -n 's/.*"replicas":\([0-9][0-9]*\).*/\1/p')
    echo "${n:-0}"
}

# Seeds to join through (their peer addresses): every lower ordinal, pod 0
# first, so that a new pod joins even while pod 0 is down.
join=
n=0
while [ "$n" -lt "$ordinal" ]; do
    join=${join:+$join,}$(fill "$peer_template" "$n")
    n=$((n + 1))
done

# Pod 0 with no data creates the cluster, unless one exists: after a lost
# volume, a second cluster under the same names would split the counts
# and break the first when their members meet. It asks every other pod,
# and waits rather than guess while one cannot be asked.
if [ "$ordinal" -eq 0 ] && empty_data; then
    every=${RELAYRATE_ASK_EVERY:-2}
    while :; do
        if ! replicas=$(scale_json | desired_replicas); then
            echo "relayrate-entrypoint: cannot read the StatefulSet's replicas; waiting before creating a cluster" >&2
            sleep "$every"
            continue
        fi
        members=''
        silent=''
        n=1
        while [ "$n" -lt "$replicas" ]; do
            case $(membership "$n") in
            member) members=${members:+$members,}$(fill "$peer_template" "$n") ;;
            unknown) silent="${silent:+$silent }$n" ;;
            esac
            n=$((n + 1))
        done
        if [ -n "$members" ]; then
            echo "relayrate-entrypoint: pod 0 has no data and a cluster exists: joining it through $members" >&2
            join=$members
            break
        fi
        if [ -z "$silent" ]; then
            echo "relayrate-entrypoint: pods 1 to $((replicas - 1)) are in no cluster: creating one" >&2
            break
        fi
        echo "relayrate-entrypoint: pod 0 has no data and pods $silent do not answer (one may hold the cluster): waiting" >&2
        sleep "$every"
    done
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
