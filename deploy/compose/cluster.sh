#!/usr/bin/env bash
# `make cluster` / `make cluster-down`: the docker-compose cluster of this folder.
#
# usage: deploy/compose/cluster.sh up [ACTORS]   start (or rescale) and wait for the first step
#        deploy/compose/cluster.sh down          stop and remove containers, network, volumes
#        deploy/compose/cluster.sh status        the replay server's counters
# environment: MODEL (tiny|smollm2, default smollm2), PROJECT (default hindsight), and every
# variable docker-compose.yml reads (HINDSIGHT_BIND, HINDSIGHT_*_PORT, STEPS, ...).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
project=${PROJECT:-hindsight}
export MODEL=${MODEL:-smollm2}
if command -v docker-compose >/dev/null; then compose=(docker-compose)
elif docker compose version >/dev/null 2>&1; then compose=(docker compose)
else echo "cluster: docker-compose or the docker compose plugin is needed" >&2; exit 2; fi
dc() { "${compose[@]}" -p "$project" -f "$here/docker-compose.yml" "$@"; }

status() {
    dc exec -T replay-server hindsight status --replay https://localhost:50051 \
        --learner https://learner:50052 --tls-ca /data/secrets/ca.pem \
        --token-file /data/secrets/status.token
}

case ${1:-up} in
up)
    actors=${2:-${ACTORS:-2}}
    case $actors in ''|*[!0-9]*) echo "cluster: ACTORS must be a number, not '$actors'" >&2; exit 2 ;; esac
    for image in "${HINDSIGHT_IMAGE:-hindsight:latest}" "${HINDSIGHT_PROMETHEUS_IMAGE:-hindsight-prometheus:latest}"; do
        docker image inspect "$image" >/dev/null 2>&1 ||
            { echo "cluster: image $image is missing: run 'make image' first" >&2; exit 2; }
    done
    started=$(date +%s)
    dc up -d --no-recreate --scale "actor=$actors"
    echo "cluster: waiting for the first learner step (model $MODEL, $actors actors)..."
    until status 2>/dev/null | grep -Eq 'learner step [1-9]'; do
        if [ $(( $(date +%s) - started )) -gt 900 ]; then
            echo "cluster: no learner step after 15 minutes; see: docker-compose -p $project logs" >&2
            exit 1
        fi
        sleep 3
    done
    bind=${HINDSIGHT_BIND:-127.0.0.1}
    cat <<INFO
cluster: training ($(( $(date +%s) - started )) s to the first step).
  Prometheus  http://$bind:${HINDSIGHT_PROMETHEUS_PORT:-9090}  (alerts: /alerts, targets: /targets)
  Grafana     docker-compose -p $project -f $here/docker-compose.yml --profile grafana up -d
              then http://$bind:${HINDSIGHT_GRAFANA_PORT:-3000}
  status      deploy/compose/cluster.sh status
  scale       make cluster ACTORS=8   (running services are not restarted)
  logs        docker-compose -p $project -f $here/docker-compose.yml logs -f learner
  stop        make cluster-down
INFO
    ;;
down)
    dc --profile grafana down -v --remove-orphans -t 30 2>/dev/null || dc down -v --remove-orphans -t 30
    ;;
status)
    status
    ;;
*)
    sed -n '2,9p' "$0"; exit 2 ;;
esac
