# Shared by the benchmark scripts (sourced, after `cd` to the repository, with $repo set).

# The median of the numbers on standard input, one per line.
median() { sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }

# server_env DB_URL STORED_MESSAGES SECRET PORT: exports the configuration a benchmark server
# runs with: the database, `[stored_messages]` settings (inside the braces, each followed by
# a comma; cleanup is always off), the secret key and the port, no logging.
server_env() {
  export ROCKET_DATABASES="{stored_messages={url=\"$1\"}}"
  export ROCKET_STORED_MESSAGES="{$2cleanup_interval_secs=0}"
  export ROCKET_SECRET_KEY="$3" ROCKET_LOG_LEVEL=off ROCKET_PORT=$4 ROCKET_ADDRESS=127.0.0.1
  export ROCKET_TEMPLATE_DIR="$repo/app/templates"
}

# wait_healthy PORT: until the server on PORT answers /health (10 s at most).
wait_healthy() {
  for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$1/health" >/dev/null && break; sleep 0.1; done
}
