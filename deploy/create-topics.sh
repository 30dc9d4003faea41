#!/usr/bin/env bash
# Create (or bring up to date) the exemplar topics: partitions and retention.
#
# Runs wherever Kafka's command-line tools are, e.g. in the apache/kafka image:
#   docker compose -f deploy/compose.yaml run --rm kafka-init   (compose runs it on `up`)
#   the Job of deploy/k8s/topics-job.yaml                      (kubectl apply -k deploy/)
#   BOOTSTRAP_SERVERS=broker:9092 KAFKA_BIN=/opt/kafka/bin deploy/create-topics.sh
# (docs/operations.md, "Topics")
#
# Idempotent: existing topics keep their data; their retention is set to the value
# below and their partition count grows to the one asked for (Kafka cannot shrink
# it). Growing the input topic is how predictors scale out: a consumer group uses at
# most one replica per partition.
#
# Settings (environment), with the daemon's own names where one exists:
#   BOOTSTRAP_SERVERS (or EXEMPLAR_KAFKA__BOOTSTRAP_SERVERS)   default localhost:9092
#   EXEMPLAR_TOPICS__PARTITIONS          partitions of the streaming topics   default 6
#   EXEMPLAR_TOPICS__REPLICATION_FACTOR  replicas per partition               default 1
#   EXEMPLAR_TOPICS__<ROLE>  topic name, ROLE one of INPUT OUTPUT ADJUDICATION DECISIONS
#                            DEAD_LETTER MODEL_UPDATES LIFECYCLE (the daemon's roles)
#   RETENTION_<ROLE>_MS      retention.ms of that topic (-1 keeps forever)
#   COMMAND_CONFIG        client properties file for a secured cluster (SASL/TLS)
#   KAFKA_BIN             directory of kafka-topics.sh / kafka-configs.sh (/opt/kafka/bin)
#   WAIT_S                how long to wait for the broker                      default 120
set -euo pipefail

KAFKA_BIN=${KAFKA_BIN:-/opt/kafka/bin}
BOOTSTRAP=${BOOTSTRAP_SERVERS:-${EXEMPLAR_KAFKA__BOOTSTRAP_SERVERS:-localhost:9092}}
PARTITIONS=${EXEMPLAR_TOPICS__PARTITIONS:-6}
REPLICATION=${EXEMPLAR_TOPICS__REPLICATION_FACTOR:-1}
WAIT_S=${WAIT_S:-120}
DAY_MS=86400000

client=(--bootstrap-server "$BOOTSTRAP")
if [[ -n "${COMMAND_CONFIG:-}" ]]; then
    client+=(--command-config "$COMMAND_CONFIG")
fi

topics() { "$KAFKA_BIN/kafka-topics.sh" "${client[@]}" "$@"; }
configs() { "$KAFKA_BIN/kafka-configs.sh" "${client[@]}" "$@"; }

# role | topic name | partitions | retention.ms | why
#   input, output: the streams themselves; a week covers a long outage or a replay.
#   adjudication: reviewers may take weeks to get through a backlog.
#   decisions: the audit trail of every human decision; kept forever.
#   dead_letter: long enough for the producer's owners to look at what they sent.
#   model_updates: one ordered announcement stream (one partition), kept forever.
#   lifecycle: predictors -> curator (rejected and close admitted events, with their
#     text); only needs to outlive a curator outage.
TOPICS=(
    "input|${EXEMPLAR_TOPICS__INPUT:-exemplar.events}|$PARTITIONS|${RETENTION_INPUT_MS:-$((7 * DAY_MS))}"
    "output|${EXEMPLAR_TOPICS__OUTPUT:-exemplar.labels}|$PARTITIONS|${RETENTION_OUTPUT_MS:-$((7 * DAY_MS))}"
    "adjudication|${EXEMPLAR_TOPICS__ADJUDICATION:-exemplar.adjudication}|$PARTITIONS|${RETENTION_ADJUDICATION_MS:-$((30 * DAY_MS))}"
    "decisions|${EXEMPLAR_TOPICS__DECISIONS:-exemplar.decisions}|$PARTITIONS|${RETENTION_DECISIONS_MS:--1}"
    "dead_letter|${EXEMPLAR_TOPICS__DEAD_LETTER:-exemplar.dlq}|$PARTITIONS|${RETENTION_DEAD_LETTER_MS:-$((14 * DAY_MS))}"
    "model_updates|${EXEMPLAR_TOPICS__MODEL_UPDATES:-exemplar.models}|1|${RETENTION_MODEL_UPDATES_MS:--1}"
    "lifecycle|${EXEMPLAR_TOPICS__LIFECYCLE:-exemplar.lifecycle}|$PARTITIONS|${RETENTION_LIFECYCLE_MS:-$((7 * DAY_MS))}"
)

echo "create-topics: waiting for $BOOTSTRAP (up to ${WAIT_S}s)"
deadline=$((SECONDS + WAIT_S))
until topics --list >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
        echo "create-topics: no broker answered at $BOOTSTRAP within ${WAIT_S}s" >&2
        exit 1
    fi
    sleep 2
done

for spec in "${TOPICS[@]}"; do
    IFS='|' read -r role name partitions retention <<<"$spec"
    topics --create --if-not-exists --topic "$name" --partitions "$partitions" \
        --replication-factor "$REPLICATION" --config "retention.ms=$retention" >/dev/null
    # --if-not-exists leaves an existing topic as it was: apply retention explicitly.
    configs --alter --entity-type topics --entity-name "$name" \
        --add-config "retention.ms=$retention" >/dev/null
    current=$(topics --describe --topic "$name" | grep -o 'PartitionCount: *[0-9]*' \
        | grep -o '[0-9]*$' | head -n 1)
    if [[ -n "$current" && "$current" -lt "$partitions" ]]; then
        echo "create-topics: $name has $current partitions, growing to $partitions"
        topics --alter --topic "$name" --partitions "$partitions" >/dev/null
        current=$partitions
    fi
    echo "create-topics: $role $name partitions=${current:-?} retention.ms=$retention"
done
echo "create-topics: done"
