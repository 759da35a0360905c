#!/usr/bin/env bash
# The live-streams benchmark: two release servers on one store (PostgreSQL, then Redis), one
# `GET /messages/stream` open per user (BENCH_STREAMS users, 10,000 by default, half on each
# server), and bench/streams.rs measuring the servers' memory per idle stream, the latency
# from a write's return (the request-free Store, a third process) to the event at the
# client, and how long a broadcast to everyone takes to reach every stream (BENCH_BROADCASTS
# of them, 3 by default, and their median). First, as the baseline of the memory figure,
# the same number of idle streams on two servers of bench/sse_floor.rs: a bare Rocket 0.5
# stream route, with nothing of this crate.
#
#   bench/streams.sh
#   BENCH_BACKENDS=redis BENCH_STREAMS=2000 bench/streams.sh
#   BENCH_OPENING=16 bench/streams.sh   # at most 16 streams opening at once
#   BENCH_SERVED_BY=listener bench/streams.sh   # only the stream listener's streams
#
# Each store is measured twice (BENCH_SERVED_BY, default "rocket,listener"): with the
# streams served by Rocket, and by the library's stream listener (`stream_address`, to which
# `GET /messages/stream` redirects; bench/streams.rs follows the redirect as a browser does).
#
# Needs psql (PostgreSQL run), redis-cli (Redis run), curl. Raises the open-files limit for
# itself and the servers (each stream is a connection on both sides).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

backends=${BENCH_BACKENDS:-postgres,redis}
streams=${BENCH_STREAMS:-10000}
samples=${BENCH_SAMPLES:-200}
broadcasts=${BENCH_BROADCASTS:-3}
opening=${BENCH_OPENING:-0}
served_by=${BENCH_SERVED_BY:-rocket,listener}
database_url=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
redis_url=${REDIS_URL:-redis://127.0.0.1:6379}
target="${CARGO_TARGET_DIR:-$repo/target}/release"
work=$(mktemp -d)
schema="sm_bench_live_$$"
prefix="sm_bench_live_$$:"
pids=()

cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  psql "$database_url" -qc "drop schema if exists $schema cascade" >/dev/null 2>&1 || true
  redis-cli -u "$redis_url" --scan --pattern "${prefix}*" 2>/dev/null | xargs -r -n 500 redis-cli -u "$redis_url" unlink >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
echo "building the release binary and the benchmark clients…" >&2
cargo build --release --quiet -p stored-messages-app --bin stored-messages --example bench-seed --example bench-streams --example bench-sse-floor

secret=$(head -c 32 /dev/urandom | base64)
port=18865
results="$work/results.txt"
: > "$results"

# Starts two servers (`COMMAND...`, on ports $port and $port+1, logs named after LABEL) and
# waits for their /health; sets $servers and $server_pids for bench-streams.
start_pair() { # label command...
  local label=$1 i
  shift
  servers="" server_pids=""
  for i in 0 1; do
    ROCKET_PORT=$((port + i)) "$@" >"$work/$label-$i.log" 2>&1 &
    pids+=($!)
    server_pids="$server_pids${server_pids:+,}$!"
    servers="$servers${servers:+,}127.0.0.1:$((port + i))"
    for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$((port + i))/health" >/dev/null && break; sleep 0.1; done
  done
}

# Stops the servers started so far; the next pair takes the next two ports.
stop_servers() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  pids=()
  port=$((port + 2))
}

run_backend() { # name rocket|listener
  local name=$1 mode=$2 db_url redis_cfg="" listener_cfg="" label=$1
  if [ "$mode" = listener ]; then
    listener_cfg='stream_address="127.0.0.1:0",'
    label="$name+listener"
  fi
  case "$name" in
    postgres)
      psql "$database_url" -qc "drop schema if exists $schema cascade; create schema $schema" >/dev/null
      db_url="$database_url?options=-c%20search_path%3D$schema" ;;
    redis)
      db_url="sqlite://$work/$label-users.sqlite?mode=rwc"
      redis_cfg="backend=\"redis\",redis_url=\"$redis_url\",redis_key_prefix=\"$prefix$mode:\"," ;;
    sqlite) db_url="sqlite://$work/$label.sqlite?mode=rwc" ;;
  esac
  export ROCKET_DATABASES="{stored_messages={url=\"$db_url\"}}"
  export ROCKET_STORED_MESSAGES="{${redis_cfg}${listener_cfg}cleanup_interval_secs=0}"
  export ROCKET_SECRET_KEY="$secret" ROCKET_LOG_LEVEL=off ROCKET_ADDRESS=127.0.0.1
  export ROCKET_TEMPLATE_DIR="$repo/app/templates"
  "$target/stored-messages" migrate >/dev/null

  local servers server_pids
  start_pair "$label" "$target/stored-messages" serve
  echo "seeding $streams users on $label…" >&2
  "$target/examples/bench-seed" --users "$streams" --messages 0 --server "127.0.0.1:$port" --cookies "$work/$label-cookies.txt" >&2
  echo "streams on $label…" >&2
  "$target/examples/bench-streams" --servers "$servers" --pids "$server_pids" \
    --cookies "$work/$label-cookies.txt" --samples "$samples" --broadcasts "$broadcasts" --opening "$opening" | sed "s/^/$label  /" >>"$results"
  stop_servers
}

# The floor: bare Rocket streams, the same allocator settings as the release binary.
run_floor() {
  local servers server_pids i
  start_pair floor env MIMALLOC_ARENA_EAGER_COMMIT=0 ROCKET_SECRET_KEY="$secret" ROCKET_LOG_LEVEL=off \
    ROCKET_ADDRESS=127.0.0.1 "$target/examples/bench-sse-floor"
  for i in $(seq 1 "$streams"); do echo "floor=$i"; done >"$work/floor-cookies.txt"
  echo "streams on bare Rocket…" >&2
  "$target/examples/bench-streams" --idle-only --servers "$servers" --pids "$server_pids" \
    --cookies "$work/floor-cookies.txt" --opening "$opening" | sed "s/^/rocket    /" >>"$results"
  stop_servers
}
run_floor

IFS=',' read -r -a list <<<"$backends"
IFS=',' read -r -a modes <<<"$served_by"
for name in "${list[@]}"; do
  for mode in "${modes[@]}"; do
    run_backend "$name" "$mode"
  done
done

echo
echo "stored-messages live streams — $(nproc) cores, $(date -u +%Y-%m-%d), two servers per store"
sed 's/^/  /' "$results"
