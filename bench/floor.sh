#!/usr/bin/env bash
# What the consistency guarantee costs W2many on PostgreSQL, measured against two experiment
# builds that break it (README, "What the guarantee costs"):
#
# - shipped: this checkout as it is; a read trusts a sync that began less than 1.5 ms before
#   it (writes wait 1.6 ms for that), or waits for one, which asks PostgreSQL (one round trip
#   per batch of requests);
# - instant: each sync is answered at once by the feed's task, without asking PostgreSQL:
#   requests that find no recent sync still wait for one, for nothing;
# - nowait: cached reads are trusted without any sync, as before the guarantee (stale
#   answers possible).
#
# The experiment builds are made from a copy of the checkout (a git worktree in a temporary
# directory, patched there, built into target/floor); nothing of them is ever committed. Each
# patch is an exact replacement of a line of today's code and stops the script if that line
# has changed. Then the three servers run side by side on one PostgreSQL, each seeded with
# 1,000 users of 10 unread messages, and wrk drives /health and GET /messages/inbox on each
# in turn, FLOOR_ROUNDS (3) rounds, 16 connections (FLOOR_CONNECTIONS). Per server and
# round it prints the ratio to that server's own /health in the same round, and the
# server's CPU per request (from /proc).
#
#   bench/floor.sh     # about 10 minutes the first time (the builds), 3 after
#
# Needs wrk, curl, psql, git. Removes its schemas and worktree at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
# shellcheck source=bench/lib.sh
. "$repo/bench/lib.sh"

database_url=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
export PGOPTIONS="${PGOPTIONS:-} -c client_min_messages=warning"
rounds=${FLOOR_ROUNDS:-3}
connections=${FLOOR_CONNECTIONS:-16}
duration=${FLOOR_DURATION:-6}
floor_target="$repo/target/floor"
work=$(mktemp -d)
tree="$work/tree"
pids=()
schemas=()

cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for schema in "${schemas[@]}"; do
    psql "$database_url" -qc "drop schema if exists $schema cascade" >/dev/null 2>&1 || true
  done
  git -C "$repo" worktree remove --force "$tree" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

for tool in wrk curl psql git python3; do
  command -v "$tool" >/dev/null || { echo "floor: $tool is missing" >&2; exit 1; }
done

# replace FILE OLD NEW: exactly one occurrence of OLD, or stop.
replace() {
  python3 - "$1" "$2" "$3" <<'EOF'
import sys
path, old, new = sys.argv[1:]
text = open(path).read()
if text.count(old) != 1:
    sys.exit(f"floor: the experiment's patch no longer applies to {path}: {old!r}")
open(path, 'w').write(text.replace(old, new))
EOF
}

build() { # name: builds the worktree's server and copies it to $work/NAME
  echo "building $1…" >&2
  (cd "$tree" && CARGO_TARGET_DIR="$floor_target" cargo build --release --quiet \
    -p stored-messages-app --bin stored-messages --example bench-seed)
  cp "$floor_target/release/stored-messages" "$work/$1"
}

echo "building shipped…" >&2
cargo build --release --quiet -p stored-messages-app --bin stored-messages --example bench-seed
cp "$repo/target/release/stored-messages" "$work/shipped"
seed="$repo/target/release/examples/bench-seed"

git -C "$repo" worktree add --detach --quiet "$tree" HEAD
replace "$tree/src/backend/sql/postgres.rs" \
  'timeout(SYNC_TIMEOUT, round_trip(&mut syncer))' \
  'timeout(SYNC_TIMEOUT, async { Ok::<(), sqlx::Error>(()) })'
build instant
git -C "$tree" checkout --quiet -- .
replace "$tree/src/changes.rs" \
  '        let quick = shared
            .quick_check' \
  '        if shared.live.load(Ordering::Relaxed) {
            return true;
        }
        let quick = shared
            .quick_check'
build nowait

secret=$(head -c 32 /dev/urandom | base64)
port=18865
declare -A server_pid server_port
for name in shipped instant nowait; do
  schema="sm_floor_${name}_$$"
  schemas+=("$schema")
  psql "$database_url" -qc "drop schema if exists $schema cascade; create schema $schema" >/dev/null
  (
    server_env "$database_url?options=-c%20search_path%3D$schema" "" "$secret" "$port"
    "$work/$name" serve >"$work/$name.log" 2>&1 &
    echo $! >"$work/$name.pid"
    wait_healthy "$port"
    "$seed" --users 1000 --messages 10 --server "127.0.0.1:$port" --cookies "$work/$name.cookies" >&2
  )
  server_pid[$name]=$(cat "$work/$name.pid")
  pids+=("${server_pid[$name]}")
  server_port[$name]=$port
  port=$((port + 1))
done

tick=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
measure() { # name path: requests/s and server CPU µs per request
  local pid=${server_pid[$1]} before after out rps requests
  before=$(cpu "$pid")
  out=$(wrk -t1 -c"$connections" -d"${duration}s" -s "$repo/bench/rotate.lua" \
    "http://127.0.0.1:${server_port[$1]}$2" -- "$work/$1.cookies")
  after=$(cpu "$pid")
  if grep -q Non-2xx <<<"$out"; then echo "floor: non-2xx answers from $1 $2" >&2; exit 1; fi
  rps=$(awk '/Requests\/sec:/ {print $2}' <<<"$out")
  requests=$(awk '/requests in/ {print $1}' <<<"$out")
  awk -v r="$rps" -v c="$((after - before))" -v t="$tick" -v n="$requests" \
    'BEGIN {printf "%.0f %.1f", r, c / t / n * 1e6}'
}

echo
echo "W2many (GET /messages/inbox, 1000 users, $connections connections) on PostgreSQL, against each server's /health — $(nproc) cores, $(date -u +%Y-%m-%d)"
printf '  %-8s %5s  %10s %10s %7s  %16s %16s\n' build round "/health" inbox ratio "CPU/req /health" "CPU/req inbox"
for round in $(seq 1 "$rounds"); do
  for name in shipped instant nowait; do
    read -r base_rps base_cpu <<<"$(measure "$name" /health)"
    read -r inbox_rps inbox_cpu <<<"$(measure "$name" /messages/inbox)"
    ratio=$(awk -v a="$inbox_rps" -v b="$base_rps" 'BEGIN {print 100 * a / b}')
    printf '  %-8s %5d  %10.0f %10.0f %6.1f%%  %13.1f µs %13.1f µs\n' "$name" "$round" \
      "$base_rps" "$inbox_rps" "$ratio" "$base_cpu" "$inbox_cpu"
    echo "$ratio $inbox_cpu" >>"$work/$name.rounds"
  done
done
echo "medians over the rounds (this machine's speed drifts within minutes: compare builds, not runs):"
for name in shipped instant nowait; do
  printf '  %-8s W2many %5.1f%% of its /health, %5.1f µs of server CPU per request\n' "$name" \
    "$(awk '{print $1}' "$work/$name.rounds" | median)" "$(awk '{print $2}' "$work/$name.rounds" | median)"
done
