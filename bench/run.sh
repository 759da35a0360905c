#!/usr/bin/env bash
# The benchmark suite: HTTP workloads with wrk against the release server on SQLite, PostgreSQL
# and Redis in turn, then the in-process backend benchmarks (W3–W6, benches/backend.rs).
# Prints one table.
#
# HTTP workloads, each measured in the same run as its baseline (GET /health, same client):
# - W1many, W2many: 1,000 logged-in users (BENCH_USERS), each with 10 unread messages of
#   their own, wrk rotating their cookies (bench/rotate.lua): GET /?keep=1 and
#   GET /messages/inbox. This is how a site is loaded. The baseline uses the same script.
#   Measured at 16 and at 64 connections (BENCH_MANY_CONNECTIONS): wrk's load is a closed
#   loop, so at 16 no more than 16 requests are in flight to share each sync with the store
#   (PostgreSQL, Redis), and each pays a larger part of it; at 64, more share it.
#   BENCH_ROUNDS (5) rounds of baseline, W1many, W2many; medians are reported, and each
#   ratio is the median of the rounds' own ratios.
# - W1, W2: the same two requests from one user, the same page over and over (kept to
#   compare with earlier runs; they flatter anything that remembers identical answers).
# Everything it creates (temporary databases, a PostgreSQL schema, Redis keys under its own
# prefix) is removed at the end.
#
#   bench/run.sh                 # everything (about 22 minutes on 2 cores after the build)
#   BENCH_BACKENDS=sqlite bench/run.sh
#   BENCH_DURATION=5 bench/run.sh
#   BENCH_HTTP_ONLY=1 bench/run.sh  # only the HTTP workloads
#
# Needs wrk (apt-get install wrk), curl, psql (for the PostgreSQL run), redis-cli (Redis).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
# shellcheck source=bench/lib.sh
. "$repo/bench/lib.sh"

backends=${BENCH_BACKENDS:-sqlite,postgres,redis}
duration=${BENCH_DURATION:-8}
connections=${BENCH_CONNECTIONS:-16}
database_url=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
redis_url=${REDIS_URL:-redis://127.0.0.1:6379}
bin="${CARGO_TARGET_DIR:-$repo/target}/release/stored-messages"
seed="${CARGO_TARGET_DIR:-$repo/target}/release/examples/bench-seed"
many=${BENCH_USERS:-1000}
many_rounds=${BENCH_ROUNDS:-5}
many_connections=${BENCH_MANY_CONNECTIONS:-16,64}
work=$(mktemp -d)
schema="sm_bench_http_$$"
prefix="sm_bench_http_$$:"
server_pid=""

cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  psql "$database_url" -qc "drop schema if exists $schema cascade" >/dev/null 2>&1 || true
  redis-cli -u "$redis_url" --scan --pattern "${prefix}*" 2>/dev/null | xargs -r -n 500 redis-cli -u "$redis_url" unlink >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

for tool in wrk curl; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is missing (apt-get install $tool)" >&2; exit 1; }
done

echo "building the release binary and benchmarks…" >&2
cargo build --release --quiet -p stored-messages-app --bin stored-messages --example bench-seed
if [ "${BENCH_HTTP_ONLY:-0}" != 1 ]; then
  cargo bench --quiet -p stored-messages --features sqlite,postgres,redis --bench backend --no-run >/dev/null 2>&1
fi

port=18765
secret=$(head -c 32 /dev/urandom | base64)
results="$work/results.txt"
: > "$results"

# wrk's summary: requests/s, p50 and p99 latency (in ms).
run_wrk() { # url, then either a cookie or "rotate FILE"
  local out
  if [ "$2" = rotate ]; then
    out=$(wrk -t1 -c"$connections" -d"${duration}s" --latency -s "$repo/bench/rotate.lua" "$1" -- "$3")
  else
    out=$(wrk -t1 -c"$connections" -d"${duration}s" --latency -H "Cookie: $2" "$1")
  fi
  local rps p50 p99
  rps=$(awk '/Requests\/sec:/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  local non2xx
  non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
  if [ -n "$non2xx" ]; then echo "bench: $non2xx non-2xx answers from $1" >&2; exit 1; fi
  echo "$rps $(to_ms "$p50") $(to_ms "$p99")"
}

median_cols() { # file col col col: the median of each column, over the rows
  local file=$1; shift
  local out="" c
  for c in "$@"; do
    out="$out $(awk -v c="$c" '{print $c}' "$file" | median)"
  done
  echo "$out"
}

to_ms() { # wrk durations: 812.00us, 1.23ms, 2.01s
  awk -v v="$1" 'BEGIN {
    if (v ~ /us$/) { sub(/us$/, "", v); printf "%.3f", v / 1000 }
    else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.3f", v }
    else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.3f", v * 1000 }
    else printf "%s", v }'
}

http_backend() { # name
  local name=$1 db_url redis_cfg=""
  case "$name" in
    sqlite) db_url="sqlite://$work/$name.sqlite?mode=rwc" ;;
    postgres)
      psql "$database_url" -qc "drop schema if exists $schema cascade; create schema $schema" >/dev/null
      db_url="$database_url?options=-c%20search_path%3D$schema" ;;
    redis)
      db_url="sqlite://$work/$name-users.sqlite?mode=rwc"
      redis_cfg="backend=\"redis\",redis_url=\"$redis_url\",redis_key_prefix=\"$prefix\"," ;;
  esac
  server_env "$db_url" "$redis_cfg" "$secret" "$port"

  echo "bench-password" | "$bin" createuser bench >/dev/null
  "$bin" serve >"$work/$name.log" 2>&1 &
  server_pid=$!
  wait_healthy "$port"

  # log in like a browser, then give the user 10 unread stored messages
  local jar="$work/$name.cookies" token
  token=$(curl -fs -c "$jar" -b "$jar" "http://127.0.0.1:$port/login" | sed -n 's/.*name="csrf_token" value="\([^"]*\)".*/\1/p' | head -1)
  curl -fs -o /dev/null -c "$jar" -b "$jar" --data-urlencode "csrf_token=$token" \
    -d "username=bench&password=bench-password" "http://127.0.0.1:$port/login"
  # and follow the redirect, as a browser does: the first logged-in page binds the CSRF cookie
  curl -fs -o /dev/null -c "$jar" -b "$jar" "http://127.0.0.1:$port/"
  for i in $(seq 1 10); do "$bin" send --to bench "benchmark message $i" >/dev/null; done
  local cookie
  # curl writes HttpOnly cookies (all of ours) as "#HttpOnly_<domain>" lines.
  cookie=$(sed 's/^#HttpOnly_//' "$jar" | awk -F'\t' '!/^#/ && NF >= 7 {printf "%s%s=%s", sep, $6, $7; sep="; "}')
  local unread
  unread=$(curl -fs -H "Cookie: $cookie" "http://127.0.0.1:$port/messages/count")
  [ "$unread" = '{"unread":10}' ] || { echo "bench: expected 10 unread, got $unread" >&2; exit 1; }

  local base w1 w2
  base=$(run_wrk "http://127.0.0.1:$port/health" "$cookie")
  w1=$(run_wrk "http://127.0.0.1:$port/?keep=1" "$cookie")
  local rss
  rss=$(awk '/VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$server_pid/status")
  w2=$(run_wrk "http://127.0.0.1:$port/messages/inbox" "$cookie")
  unread=$(curl -fs -H "Cookie: $cookie" "http://127.0.0.1:$port/messages/count")
  [ "$unread" = '{"unread":10}' ] || { echo "bench: W1 must keep messages unread, got $unread" >&2; exit 1; }

  # many users: each with 10 unread messages of their own, requests rotating among them
  local cookies="$work/$name-cookies.txt" mbase m1 m2
  "$seed" --users "$many" --messages 10 --server "127.0.0.1:$port" --cookies "$cookies" >&2
  # Rounds of baseline, W1many, W2many back to back: each ratio compares neighbours in time
  # (this shared machine's speed drifts), and the medians over the rounds are reported. Once
  # per number of connections in BENCH_MANY_CONNECTIONS.
  local c rounds r1 r2 mbase m1 m2
  IFS=',' read -r -a many_conns <<<"$many_connections"
  for c in "${many_conns[@]}"; do
    rounds="$work/$name-rounds-$c.txt"
    : > "$rounds"
    for _ in $(seq 1 "$many_rounds"); do
      echo "$(connections=$c run_wrk "http://127.0.0.1:$port/health" rotate "$cookies") $(connections=$c run_wrk "http://127.0.0.1:$port/?keep=1" rotate "$cookies") $(connections=$c run_wrk "http://127.0.0.1:$port/messages/inbox" rotate "$cookies")" >>"$rounds"
    done
    mbase=$(median_cols "$rounds" 1 2 3)
    m1=$(median_cols "$rounds" 4 5 6)
    m2=$(median_cols "$rounds" 7 8 9)
    r1=$(awk '{print 100*$4/$1}' "$rounds" | median)
    r2=$(awk '{print 100*$7/$1}' "$rounds" | median)
    read -r mb_rps mb_p50 mb_p99 <<<"$mbase"
    read -r m1_rps m1_p50 m1_p99 <<<"$m1"
    read -r m2_rps m2_p50 m2_p99 <<<"$m2"
    {
      printf "%-9s baseline GET /health, %4d users, %3d conns  %9.0f req/s  p50 %7.3f ms  p99 %7.3f ms\n" "$name" "$many" "$c" "$mb_rps" "$mb_p50" "$mb_p99"
      printf "%-9s W1many GET /?keep=1, %4d users, %3d conns   %9.0f req/s  p50 %7.3f ms  p99 %7.3f ms  %5.1f%% of baseline\n" "$name" "$many" "$c" "$m1_rps" "$m1_p50" "$m1_p99" "$r1"
      printf "%-9s W2many GET /messages/inbox, %4d users, %3d conns %7.0f req/s  p50 %7.3f ms  p99 %7.3f ms  %5.1f%% of baseline\n" "$name" "$many" "$c" "$m2_rps" "$m2_p50" "$m2_p99" "$r2"
    } >>"$results"
  done
  unread=$(curl -fs -H "Cookie: $(tail -1 "$cookies")" "http://127.0.0.1:$port/messages/count")
  [ "$unread" = '{"unread":10}' ] || { echo "bench: W1many must keep messages unread, got $unread" >&2; exit 1; }
  local mrss
  mrss=$(awk '/VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$server_pid/status")
  kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=""

  read -r b_rps b_p50 b_p99 <<<"$base"
  read -r w1_rps w1_p50 w1_p99 <<<"$w1"
  read -r w2_rps w2_p50 w2_p99 <<<"$w2"
  {
    printf "%-9s peak RSS of the server after the many-users runs  %.1f MB\n" "$name" "$mrss"
    printf "%-9s baseline GET /health, one user %8.0f req/s  p50 %7.3f ms  p99 %7.3f ms\n" "$name" "$b_rps" "$b_p50" "$b_p99"
    printf "%-9s W1 GET /?keep=1, one user      %9.0f req/s  p50 %7.3f ms  p99 %7.3f ms  %5.1f%% of baseline\n" "$name" "$w1_rps" "$w1_p50" "$w1_p99" "$(awk -v a="$w1_rps" -v b="$b_rps" 'BEGIN {print 100*a/b}')"
    printf "%-9s W2 GET /messages/inbox, one user %7.0f req/s  p50 %7.3f ms  p99 %7.3f ms  %5.1f%% of baseline\n" "$name" "$w2_rps" "$w2_p50" "$w2_p99" "$(awk -v a="$w2_rps" -v b="$b_rps" 'BEGIN {print 100*a/b}')"
    printf "%-9s peak RSS of the server after W1  %.1f MB\n" "$name" "$rss"
  } >>"$results"
  port=$((port + 1))
}

IFS=',' read -r -a list <<<"$backends"
for name in "${list[@]}"; do
  echo "HTTP workloads on $name…" >&2
  http_backend "$name"
done

if [ "${BENCH_HTTP_ONLY:-0}" != 1 ]; then
  echo "backend workloads (W3–W6)…" >&2
  BENCH_BACKENDS="$backends" BENCH_SIZES="${BENCH_SIZES:-10000,100000,1000000}" \
    cargo bench --quiet -p stored-messages --features sqlite,postgres,redis --bench backend 2>/dev/null | grep -E '^(sqlite|postgres|redis) ' >>"$results"
fi

echo
echo "stored-messages benchmarks — $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(date -u +%Y-%m-%d), wrk -t1 -d${duration}s, -c$connections for one user, -c$many_connections for $many users"
sort -s -k1,1 "$results" | sed 's/^/  /'
