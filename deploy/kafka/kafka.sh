#!/usr/bin/env bash
# Local Apache Kafka (KRaft, no ZooKeeper) for streambill, from the official jars on Maven Central.
#
#   deploy/kafka/kafka.sh fetch                 download the jars once (Maven) into the cache
#   deploy/kafka/kafka.sh start [--brokers N]   format KRaft storage (first time) and start N nodes (1 or 3)
#   deploy/kafka/kafka.sh wait                  block until every node serves requests
#   deploy/kafka/kafka.sh stop [NODE]           stop all nodes (or one, for fault tests)
#   deploy/kafka/kafka.sh start-node NODE       start one stopped node of the running cluster again
#   deploy/kafka/kafka.sh status | bootstrap
#   deploy/kafka/kafka.sh bootstrap-sasl        the SASL_PLAINTEXT (SCRAM-SHA-512) listeners
#
# `start` prints the bootstrap servers on its last line. Nothing is started when
# KAFKA_BOOTSTRAP_SERVERS is set (an existing cluster is used).
#
# Every node also has a client listener SASL_PLAINTEXT with SCRAM-SHA-512 (port +2), for
# testing authenticated clients; inter-broker and controller traffic stay PLAINTEXT. It has
# no users until one is created through the Admin API over PLAINTEXT (e.g. confluent_kafka
# AdminClient.alter_user_scram_credentials); clients then set KAFKA_SECURITY_PROTOCOL=
# SASL_PLAINTEXT, KAFKA_SASL_MECHANISM=SCRAM-SHA-512, KAFKA_SASL_USERNAME/PASSWORD.
#
# Environment: STREAMBILL_KAFKA_DIR (broker data and logs; default <repo>/.streambill/kafka),
# STREAMBILL_CACHE (jars; default ~/.cache/streambill), KAFKA_HEAP_MB (per node, default 768),
# STREAMBILL_KAFKA_PORT_BASE (default 19092; node n listens on base + 100*(n-1), its controller
# on +1, its SASL listener on +2), KAFKA_BROKER_SESSION_TIMEOUT_MS (how long a silent node
# keeps its partitions before the controller fences it; default Kafka's 9000).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
KAFKA_VERSION="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$here/pom.xml")"
cache="${STREAMBILL_CACHE:-$HOME/.cache/streambill}"
libs="$cache/kafka-$KAFKA_VERSION/libs"
state="${STREAMBILL_KAFKA_DIR:-$repo/.streambill/kafka}"
port_base="${STREAMBILL_KAFKA_PORT_BASE:-19092}"
heap_mb="${KAFKA_HEAP_MB:-768}"

log() { echo "kafka.sh: $*" >&2; }

broker_port() { echo $((port_base + 100 * ($1 - 1))); }
controller_port() { echo $((port_base + 100 * ($1 - 1) + 1)); }
sasl_port() { echo $((port_base + 100 * ($1 - 1) + 2)); }
node_count() { cat "$state/brokers" 2>/dev/null || echo 0; }
node_pid() { cat "$state/node-$1/pid" 2>/dev/null || true; }
node_alive() { local pid; pid="$(node_pid "$1")"; [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }

bootstrap() { # [port function]
  local n i out="" port="${1:-broker_port}"
  n="$(node_count)"
  for ((i = 1; i <= n; i++)); do out+="${out:+,}127.0.0.1:$("$port" "$i")"; done
  echo "$out"
}

fetch() {
  if [ -f "$libs/.complete" ]; then return 0; fi
  command -v mvn >/dev/null || { log "Maven (mvn) is needed once to fetch the Kafka jars"; exit 1; }
  command -v java >/dev/null || { log "Java 17+ is needed to run Kafka"; exit 1; }
  log "fetching Apache Kafka $KAFKA_VERSION jars from Maven Central into $libs (once)"
  mkdir -p "$libs"
  mvn -q -B -Dstyle.color=never -f "$here/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$libs" >&2
  touch "$libs/.complete"
}

write_config() { # node total
  local node="$1" total="$2" voters="" i
  for ((i = 1; i <= total; i++)); do voters+="${voters:+,}$i@127.0.0.1:$(controller_port "$i")"; done
  local rf=1 isr=1
  if [ "$total" -ge 3 ]; then rf=3; isr=2; fi
  mkdir -p "$state/node-$node"
  cat >"$state/node-$node/server.properties" <<EOF
process.roles=broker,controller
node.id=$node
controller.quorum.voters=$voters
listeners=PLAINTEXT://127.0.0.1:$(broker_port "$node"),CONTROLLER://127.0.0.1:$(controller_port "$node"),SASL_PLAINTEXT://127.0.0.1:$(sasl_port "$node")
advertised.listeners=PLAINTEXT://127.0.0.1:$(broker_port "$node"),SASL_PLAINTEXT://127.0.0.1:$(sasl_port "$node")
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT
inter.broker.listener.name=PLAINTEXT
# clients only: SCRAM users are created at runtime through the Admin API (no authorizer,
# so an authenticated user may do anything)
listener.name.sasl_plaintext.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
log.dirs=$state/node-$node/data
num.partitions=12
default.replication.factor=$rf
min.insync.replicas=$isr
offsets.topic.replication.factor=$rf
offsets.topic.num.partitions=12
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$isr
transaction.state.log.num.partitions=12
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$isr
auto.create.topics.enable=false
# tests and demos must not sit out a rebalance delay
group.initial.rebalance.delay.ms=0
group.consumer.min.session.timeout.ms=3000
group.classic.min.session.timeout.ms=3000
transaction.abort.timed.out.transaction.cleanup.interval.ms=5000
broker.session.timeout.ms=${KAFKA_BROKER_SESSION_TIMEOUT_MS:-9000}
log.retention.hours=-1
log.segment.bytes=268435456
num.network.threads=2
num.io.threads=4
EOF
}

start_node() { # node
  local node="$1" dir="$state/node-$1"
  if node_alive "$node"; then return 0; fi
  : >"$dir/server.log"
  # shellcheck disable=SC2086
  nohup java -Xms256m -Xmx"${heap_mb}"m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -Djava.awt.headless=true -Dlog4j2.configurationFile="$here/log4j2.xml" \
    -Dkafka.logs.dir="$dir" -cp "$libs/*" kafka.Kafka "$dir/server.properties" \
    >>"$dir/server.log" 2>&1 9>&- &
  echo $! >"$dir/pid"
  log "node $node started (pid $!, port $(broker_port "$node"), log $dir/server.log)"
}

wait_ready() {
  local n i deadline=$((SECONDS + ${KAFKA_START_TIMEOUT:-120}))
  n="$(node_count)"
  for ((i = 1; i <= n; i++)); do
    node_alive "$i" || continue # a node stopped on purpose (fault tests) is not waited for
    until grep -q "Kafka Server started" "$state/node-$i/server.log" 2>/dev/null; do
      if ! node_alive "$i"; then
        log "node $i died during start-up; last log lines:"
        tail -n 30 "$state/node-$i/server.log" >&2
        exit 1
      fi
      if [ $SECONDS -ge $deadline ]; then log "node $i not ready in time"; exit 1; fi
      sleep 0.2
    done
  done
}

start() {
  local total=1
  while [ $# -gt 0 ]; do
    case "$1" in
      --brokers) total="$2"; shift 2 ;;
      *) log "unknown option $1"; exit 2 ;;
    esac
  done
  if [ -n "${KAFKA_BOOTSTRAP_SERVERS:-}" ]; then
    log "KAFKA_BOOTSTRAP_SERVERS is set: using that cluster, starting nothing"
    echo "$KAFKA_BOOTSTRAP_SERVERS"
    return 0
  fi
  fetch
  mkdir -p "$state"
  exec 9>"$state/.lock"
  flock 9 # one starter at a time (parallel test workers, demo + tests)
  local running; running="$(node_count)"
  if [ "$running" != 0 ] && [ "$running" != "$total" ] && any_alive; then
    log "a $running-node cluster is running; stop it before starting $total nodes"
    exit 1
  fi
  if [ "$running" != "$total" ]; then
    rm -rf "$state"/node-*
    echo "$total" >"$state/brokers"
  fi
  local cluster_id i
  cluster_id="$(cat "$state/cluster-id" 2>/dev/null || true)"
  if [ -z "$cluster_id" ] || [ ! -d "$state/node-1/data" ]; then
    cluster_id="$(java -cp "$libs/*" -Dlog4j2.configurationFile="$here/log4j2.xml" \
      kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1)"
    echo "$cluster_id" >"$state/cluster-id"
  fi
  for ((i = 1; i <= total; i++)); do
    write_config "$i" "$total"
    if [ ! -f "$state/node-$i/data/meta.properties" ]; then
      java -cp "$libs/*" -Dlog4j2.configurationFile="$here/log4j2.xml" kafka.tools.StorageTool \
        format -t "$cluster_id" -c "$state/node-$i/server.properties" --ignore-formatted >/dev/null
    fi
    start_node "$i"
  done
  wait_ready
  bootstrap
}

any_alive() {
  local n i; n="$(node_count)"
  for ((i = 1; i <= n; i++)); do node_alive "$i" && return 0; done
  return 1
}

stop_node() { # node
  local pid; pid="$(node_pid "$1")"
  [ -n "$pid" ] || return 0
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
    log "node $1 stopped"
  fi
  rm -f "$state/node-$1/pid"
}

stop() {
  if [ $# -gt 0 ]; then stop_node "$1"; return 0; fi
  local n i; n="$(node_count)"
  for ((i = n; i >= 1; i--)); do stop_node "$i"; done
}

status() {
  local n i; n="$(node_count)"
  if [ "$n" = 0 ]; then echo "no local cluster"; return 0; fi
  for ((i = 1; i <= n; i++)); do
    if node_alive "$i"; then s=running; else s=stopped; fi
    echo "node $i: $s 127.0.0.1:$(broker_port "$i") (SASL 127.0.0.1:$(sasl_port "$i"))"
  done
}

cmd="${1:-}"; shift || true
case "$cmd" in
  fetch) fetch ;;
  start) start "$@" ;;
  start-node) fetch; start_node "$1"; wait_ready ;;
  wait) wait_ready ;;
  stop) stop "$@" ;;
  status) status ;;
  bootstrap) bootstrap ;;
  bootstrap-sasl) bootstrap sasl_port ;;
  *) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 2 ;;
esac
