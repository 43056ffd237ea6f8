# shellcheck shell=bash
# Sourced by scripts/bench-postfix and scripts/try-postfix: a throwaway
# Postfix instance, all of it (config, queue, log) in one directory, that
# listens on loopback, relays everything from 127.0.0.0/8 to a next hop on
# loopback, and asks the milters given; the recipe the Rust tests use
# (tests/common). Needs root: Postfix's master starts its daemons as user
# postfix.

# Writes the configuration under DIR/etc and starts Postfix.
#   postfix_start DIR NAME SMTP_PORT NEXT_HOP_PORT MILTERS [main.cf setting...]
postfix_start() {
  local dir=$1 name=$2 port=$3 next_hop=$4 milters=$5
  shift 5
  mkdir -p "$dir/etc" "$dir/data" "$dir/queue"
  chown postfix "$dir/data"
  cp /etc/postfix/master.cf "$dir/etc/master.cf"
  : > "$dir/etc/main.cf"
  /usr/sbin/postconf -c "$dir/etc" -e \
    "queue_directory = $dir/queue" \
    "data_directory = $dir/data" \
    "maillog_file = $dir/maillog" \
    "maillog_file_prefixes = $dir" \
    "compatibility_level = 3.6" \
    "myhostname = $name.relay.test" \
    "mydestination =" \
    "alias_maps =" \
    "alias_database =" \
    "inet_interfaces = 127.0.0.1" \
    "inet_protocols = ipv4" \
    "mynetworks = 127.0.0.0/8" \
    "smtpd_relay_restrictions = permit_mynetworks, reject" \
    "relayhost = [127.0.0.1]:$next_hop" \
    "smtp_dns_support_level = disabled" \
    "smtpd_peername_lookup = no" \
    "in_flow_delay = 0" \
    "smtpd_client_connection_count_limit = 0" \
    "smtpd_milters = $milters" \
    "milter_default_action = tempfail" \
    "milter_protocol = 6" \
    "syslog_name = postfix-$name" \
    "$@"
  /usr/sbin/postconf -c "$dir/etc" -M# smtp/inet
  /usr/sbin/postconf -c "$dir/etc" -Me "127.0.0.1:$port/inet = 127.0.0.1:$port inet n - n - - smtpd"
  /usr/sbin/postconf -c "$dir/etc" -F '*/*/chroot = n'
  /usr/sbin/postfix -c "$dir/etc" start >/dev/null 2>&1
}

# Stops the instance in DIR and waits (at most 10 s) for its master to go.
postfix_stop() {
  local dir=$1 pid
  /usr/sbin/postfix -c "$dir/etc" stop >/dev/null 2>&1
  for _ in $(seq 1 100); do
    pid=$(cat "$dir/queue/pid/master.pid" 2>/dev/null | tr -d ' ') || return 0
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
}

# Whether the smtpd on PORT greets with 220.
postfix_answers() {
  local line
  line=$( { exec 3<>"/dev/tcp/127.0.0.1/$1" && IFS= read -r -t 5 l <&3 \
            && printf 'QUIT\r\n' >&3 && echo "$l"; } 2>/dev/null ) || return 1
  [[ $line == 220* ]]
}
