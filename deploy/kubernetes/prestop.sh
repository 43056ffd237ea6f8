#!/bin/sh
# relayrate-prestop: the StatefulSet's preStop hook. A pod that goes away
# because the StatefulSet was scaled below it (its ordinal >= the desired
# replicas) takes its node out of the Raft membership, so that the majority
# is counted over nodes that still exist. Any other stop (a restart, an
# eviction, a node drain, a rolling update, scaling to 0) keeps the member:
# the pod comes back with its data.
#
# Environment, as for the entrypoint: RELAYRATE_POD_NAME, RELAYRATE_LISTEN,
# RELAYRATE_CLIENT (or RELAYRATE_PEER, whose host it defaults to),
# RELAYRATE_DATA_DIR, RELAYRATECTL, RELAYRATE_ADMIN_TOKEN_FILE (read by
# relayratectl: remove-node is an admin write); and
#   RELAYRATE_REMOVE_TIMEOUT  seconds to keep trying remove-node, at least
#                             (default 20; up to 1 s more, and one more
#                             try may take 2 x 5 s)
#   RELAYRATE_SCALE_JSON      a file holding the StatefulSet's Scale, read
#                             instead of asking the Kubernetes API (tests)
set -u

ctl=${RELAYRATECTL:-/usr/local/bin/relayratectl}
# Container runtimes set HOSTNAME to the pod's name.
# shellcheck disable=SC3028
pod=${RELAYRATE_POD_NAME:-${HOSTNAME:-}}
timeout=${RELAYRATE_REMOVE_TIMEOUT:-20}
sa=/var/run/secrets/kubernetes.io/serviceaccount

say() {
    echo "relayrate-prestop: $*" >&2
}

ordinal=${pod##*-}
case $ordinal in
'' | *[!0-9]*)
    say "no ordinal at the end of the pod name '$pod'; staying a member"
    exit 0
    ;;
esac
id=$((ordinal + 1))
data=$(printf '%s' "${RELAYRATE_DATA_DIR:-/var/lib/relayrate}" | sed "s/{ordinal}/$ordinal/g")

# The StatefulSet's Scale subresource (RBAC: get statefulsets/scale),
# e.g. {"kind":"Scale",...,"spec":{"replicas":3},"status":{...}}.
scale_json() {
    if [ -n "${RELAYRATE_SCALE_JSON:-}" ]; then
        cat "$RELAYRATE_SCALE_JSON"
        return
    fi
    curl --silent --show-error --fail --max-time 5 \
        --cacert "$sa/ca.crt" \
        --header "Authorization: Bearer $(cat "$sa/token")" \
        "https://kubernetes.default.svc/apis/apps/v1/namespaces/$(cat "$sa/namespace")/statefulsets/${pod%-*}/scale"
}

# Prints spec.replicas of the Scale read on stdin; fails on anything else.
# spec.replicas is left out of the JSON when it is 0.
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

if ! replicas=$(scale_json | desired_replicas); then
    # Not knowing is a reason to stay: a member too many is harmless,
    # a member removed by mistake costs a rejoin.
    say "cannot read the StatefulSet's replicas; node $id stays a member"
    exit 0
fi
if [ "$replicas" -eq 0 ]; then
    say "the StatefulSet is scaled to 0 and will come back with its data; node $id stays a member"
    exit 0
fi
if [ "$ordinal" -lt "$replicas" ]; then
    say "replicas=$replicas, ordinal $ordinal: a restart; node $id stays a member"
    exit 0
fi

# Ask the local node on its client port; it forwards to the leader.
listen=$(printf '%s' "${RELAYRATE_LISTEN:-0.0.0.0:7450}" | sed "s/{ordinal}/$ordinal/g")
node="http://$(printf '%s' "$listen" | sed 's/^0\.0\.0\.0:/127.0.0.1:/; s/^\[::\]:/[::1]:/')"
# Pod 0, never removed by a scale-down, tells whether the removal is done:
# asked on its client port (RELAYRATE_PEER names the peer port, which
# serves only the Raft service).
seed=$node
client=${RELAYRATE_CLIENT:-}
if [ -z "$client" ] && [ -n "${RELAYRATE_PEER:-}" ]; then
    client=${RELAYRATE_PEER%:*}:${listen##*:}
fi
if [ -n "$client" ]; then
    seed="http://$(printf '%s' "$client" | sed "s/{ordinal}/0/g")"
fi
say "replicas=$replicas, ordinal $ordinal: scaled down, removing node $id"
# date +%s reads whole seconds: the start may be up to 1 s later than it
# reads, so the hook gives up only once the clock reads past the end, and
# so tries for at least $timeout seconds (and less than one more).
end=$(($(date +%s) + timeout))
# Whether node $id has left the cluster, given remove-node's answer: a
# removed node refuses everything with "removed from the cluster" (even
# the answer to its own removal), or pod 0 no longer lists it (a removal
# whose answer was lost). False when it cannot tell.
gone() {
    case $1 in *"removed from the cluster"*) return 0 ;; esac
    members=$("$ctl" --node "$seed" --timeout-secs 5 members --json) || return 1
    ! printf '%s' "$members" | grep -q "\"id\":$id,"
}
# Several pods may leave at once; a membership change in progress refuses
# the next one, so try again until the deadline.
until answer=$("$ctl" --node "$node" --timeout-secs 5 remove-node "$id" 2>&1) || gone "$answer"; do
    say "not yet: $answer"
    if [ "$(date +%s)" -gt "$end" ]; then
        say "node $id not removed within ${timeout}s; remove it by hand: relayratectl remove-node $id"
        exit 1
    fi
    sleep 1
done
# The data now belongs to no member: the entrypoint clears it if this
# ordinal ever comes back (the volume claim is kept).
touch "$data/removed-from-cluster"
say "node $id removed"
