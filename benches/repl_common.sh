# Shared helpers of the replication benchmarks (benches/repl_*.sh); sourced, not run.
#
# The caller sets NAME (e.g. repl_catchup) and PORT_BASE before sourcing, and may set BLOCKFERRY
# (the binary; default build/release/blockferry of this repository, built by
# `cargo build --release -p blockferry-tools`), BENCH_DIR (work directory on a real disk; default
# /var/tmp/blockferry-$NAME) and NO_BUILD=1 (use BLOCKFERRY as it is).
#
# What it gives: die/log/need, a private copy of the binary, keys for an agent and a target,
# start_target / start_agent / start_impair (each waits until ready and records the pid for the
# cleanup), and `rq`, a Python helper for the admin sockets (status, polling until in sync, RPO
# sampling) and the impairment proxy's control socket. Every command line it starts is appended
# to $OUT_DIR/commands.txt, which the scripts print at the end.

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${BLOCKFERRY:-$REPO/build/release/blockferry}"
BENCH_DIR="${BENCH_DIR:-/var/tmp/blockferry-$NAME}"
OUT_DIR="$REPO/build/bench-$NAME"
MD="$REPO/build/bench-$NAME.md"
T_START=$SECONDS

die() { echo "$NAME.sh: $*" >&2; exit 1; }
log() { echo "[$(date +%T)] $*" >&2; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 not found: install it (apt-get install $2)"; }
if [ -x /usr/bin/python3 ]; then PY=/usr/bin/python3; else need python3 python3; PY=python3; fi

# ---- binary --------------------------------------------------------------------------------------
if [ "${NO_BUILD:-0}" != 1 ] && [ -z "${BLOCKFERRY:-}" ]; then
    need cargo "rustup / cargo"
    log "building blockferry (release): cargo build --release -p blockferry-tools"
    (cd "$REPO" && cargo build --release -p blockferry-tools) || die "cargo build failed"
fi
[ -x "$BIN" ] || die "$BIN missing (build it with cargo build --release -p blockferry-tools, or set BLOCKFERRY)"
"$BIN" target --help >/dev/null 2>&1 || die "$BIN has no 'target' subcommand (needs replication, issue 4)"
REV="$(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown)"

# ---- work directory on a real disk ---------------------------------------------------------------
mkdir -p "$BENCH_DIR" "$OUT_DIR"
BENCH_DIR="$(cd "$BENCH_DIR" && pwd)"
fstype="$(stat -f -c %T "$BENCH_DIR")"
case "$fstype" in tmpfs|ramfs) die "$BENCH_DIR is on $fstype: set BENCH_DIR to a directory on a real disk" ;; esac
rm -rf "${OUT_DIR:?}"/* "${BENCH_DIR:?}"/*
# A private copy: others may rebuild the binary while this runs.
cp "$BIN" "$BENCH_DIR/blockferry"
BF="$BENCH_DIR/blockferry"
: > "$OUT_DIR/commands.txt"

PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
    if [ "${KEEP:-0}" = 0 ]; then rm -rf "${BENCH_DIR:?}"/*; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Records a command line (as the reader would type it, BF shown as `blockferry`).
record() {
    local line="${*//$BF/blockferry}"
    grep -qxF -- "$line" "$OUT_DIR/commands.txt" || echo "$line" >> "$OUT_DIR/commands.txt"
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_line PID LOGFILE PATTERN WHAT
wait_line() {
    local pid="$1" f="$2" pat="$3" what="$4" t=0
    while ! grep -q "$pat" "$f" 2>/dev/null; do
        kill -0 "$pid" 2>/dev/null || { tail -20 "$f" >&2; die "$what exited at start (log above: $f)"; }
        t=$((t + 1)); [ "$t" -gt 600 ] && die "$what not ready after 60 s (log: $f)"
        sleep 0.1
    done
}

# ---- keys ----------------------------------------------------------------------------------------
make_keys() {
    "$BF" keygen --dir "$BENCH_DIR/keys-agent" > "$OUT_DIR/keygen-agent.txt" 2>&1 || die "keygen failed"
    "$BF" keygen --dir "$BENCH_DIR/keys-target" > "$OUT_DIR/keygen-target.txt" 2>&1 || die "keygen failed"
    AGENT_FP="$(grep -o 'sha256:[0-9a-fA-F:]*' "$OUT_DIR/keygen-agent.txt" | head -1)"
    TARGET_FP="$(grep -o 'sha256:[0-9a-fA-F:]*' "$OUT_DIR/keygen-target.txt" | head -1)"
    [ -n "$AGENT_FP" ] && [ -n "$TARGET_FP" ] || die "no fingerprint in keygen's output ($OUT_DIR/keygen-*.txt)"
    record "$BF" keygen --dir "$BENCH_DIR/keys-agent"
    record "$BF" keygen --dir "$BENCH_DIR/keys-target"
}

# start_target KEY PORT DIR: sets PID_OF[KEY]; admin socket $BENCH_DIR/KEY.sock.
declare -A PID_OF
start_target() {
    local key="$1" port="$2" dir="$3" logf="$OUT_DIR/$1.log"
    mkdir -p "$dir"
    rm -f "$BENCH_DIR/$key.sock"
    local cmd=("$BF" target --listen "127.0.0.1:$port" --dir "$dir" --key-dir "$BENCH_DIR/keys-target"
               --allow "$AGENT_FP" --admin "$BENCH_DIR/$key.sock")
    record "${cmd[@]}"
    "${cmd[@]}" >"$logf" 2>&1 &
    PID_OF[$key]=$!; PIDS+=("$!")
    wait_line "$!" "$logf" "target listening on" "target $key"
}

# start_agent KEY NBD_PORT VOLDIR [extra agent args...]: sets PID_OF[KEY]; admin $BENCH_DIR/KEY.sock.
start_agent() {
    local key="$1" port="$2" vol="$3" logf="$OUT_DIR/$1.log"; shift 3
    port_busy "$port" && die "port $port is already in use (set PORT_BASE)"
    rm -f "$BENCH_DIR/$key.sock"
    local cmd=("$BF" agent --volume "$vol" --listen "127.0.0.1:$port" --admin "$BENCH_DIR/$key.sock" "$@")
    record "${cmd[@]}"
    "${cmd[@]}" >"$logf" 2>&1 &
    PID_OF[$key]=$!; PIDS+=("$!")
    wait_line "$!" "$logf" "listening on" "agent $key"
}

# start_impair KEY LISTEN_PORT UPSTREAM_PORT [extra impair args...]: control socket $BENCH_DIR/KEY.sock.
start_impair() {
    local key="$1" lport="$2" uport="$3" logf="$OUT_DIR/$1.log"; shift 3
    rm -f "$BENCH_DIR/$key.sock"
    local cmd=("$BF" impair --listen "127.0.0.1:$lport" --upstream "127.0.0.1:$uport" --seed 1
               --control "$BENCH_DIR/$key.sock" "$@")
    record "${cmd[@]}"
    "${cmd[@]}" >"$logf" 2>&1 &
    PID_OF[$key]=$!; PIDS+=("$!")
    local t=0
    while [ ! -S "$BENCH_DIR/$key.sock" ]; do
        kill -0 "${PID_OF[$key]}" 2>/dev/null || { tail -20 "$logf" >&2; die "impair $key exited at start"; }
        t=$((t + 1)); [ "$t" -gt 300 ] && die "impair $key: no control socket after 30 s"
        sleep 0.1
    done
}

# stop KEY: SIGTERM, wait (clean stop).
stop() {
    local pid="${PID_OF[$1]}"
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# CPU ticks (utime + stime, all threads) of a process.
proc_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }

# ---- rq: admin sockets and proxy control ---------------------------------------------------------
cat > "$OUT_DIR/rq.py" <<'EOF'
"""Admin-socket and impairment-proxy helper of benches/repl_*.sh.

  rq.py status SOCK                      the /v1/status JSON
  rq.py field SOCK KEY                   volumes[0][KEY]
  rq.py impair SOCK COMMAND...           one control line (blackhole on, stats, ...); prints reply
  rq.py wait-sync AGENT_SOCK TARGET_SOCK T0 TIMEOUT
      polls every 20 ms until the agent reports state in-sync with lag_bytes 0 and no epoch
      outstanding; prints JSON: seconds from T0 (a time.time() value) to (a) the first poll that
      saw the agent connected again (connects grew), (b) the target's last_committed_epoch reaching
      the agent's final one, (c) the agent reporting in sync.
  rq.py sample SOCK INTERVAL SECONDS OUT   writes "t rpo lag state throughput" lines
"""
import http.client, json, socket, sys, time


class UnixConn(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=10)
        self.path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(self.path)
        self.sock = s


def status(sock):
    c = UnixConn(sock)
    c.request("GET", "/v1/status")
    r = c.getresponse()
    body = r.read()
    c.close()
    return json.loads(body)


def vol(sock):
    return status(sock)["volumes"][0]


def impair(sock, line):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock)
    s.sendall((line + "\n").encode())
    buf = b""
    while not buf.endswith(b"\n"):
        d = s.recv(65536)
        if not d:
            break
        buf += d
    s.close()
    return buf.decode().strip()


def main():
    cmd = sys.argv[1]
    if cmd == "status":
        print(json.dumps(status(sys.argv[2])))
    elif cmd == "field":
        v = vol(sys.argv[2])
        for k in sys.argv[3].split("."):
            v = v[k]
        print(v)
    elif cmd == "impair":
        r = impair(sys.argv[2], " ".join(sys.argv[3:]))
        print(r)
        if r.startswith("error"):
            sys.exit(1)
    elif cmd == "wait-sync":
        asock, tsock, t0, timeout = sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
        first = vol(asock)
        c0 = first.get("connects", 0)
        connected = None
        seen = []  # (t, target committed epoch)
        while True:
            now = time.time()
            a = vol(asock)
            try:
                te = vol(tsock)["last_committed_epoch"]
            except Exception:
                te = -1
            seen.append((now - t0, te))
            if connected is None and a.get("connects", 0) > c0 and a["state"] != "disconnected":
                connected = now - t0
            if a["state"] == "in-sync" and a["lag_bytes"] == 0 and a.get("lag_epochs", 0) == 0:
                final = a["last_committed_epoch"]
                tt = next((t for t, e in seen if e >= final), now - t0)
                print(json.dumps({"connected_s": connected, "target_committed_s": tt,
                                  "agent_in_sync_s": now - t0, "final_epoch": final,
                                  "status": a}))
                return
            if now - t0 > timeout:
                print(json.dumps({"timeout": True, "status": a}))
                sys.exit(1)
            time.sleep(0.02)
    elif cmd == "sample":
        sock, interval, secs, out = sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
        t0 = time.time()
        nxt = t0
        with open(out, "w") as f:
            while time.time() - t0 < secs:
                v = vol(sock)
                f.write(f"{time.time() - t0:.3f} {v['rpo_seconds']} {v['lag_bytes']} {v['state']} "
                        f"{v['throughput_bps']} {v['wire_bytes_sent']} {v.get('buffered_bytes', 0)}\n")
                f.flush()
                nxt += interval
                time.sleep(max(0.0, nxt - time.time()))
    else:
        sys.exit(f"rq.py: unknown command {cmd}")


main()
EOF
rq() { "$PY" "$OUT_DIR/rq.py" "$@"; }

# wait_state SOCK STATE TIMEOUT_S: until volumes[0].state == STATE and lag_bytes == 0.
wait_in_sync() {
    local sock="$1" timeout="$2" t=0 st lag
    while :; do
        st="$(rq field "$sock" state 2>/dev/null || echo '?')"
        lag="$(rq field "$sock" lag_bytes 2>/dev/null || echo '?')"
        [ "$st" = in-sync ] && [ "$lag" = 0 ] && return 0
        t=$((t + 1)); [ "$t" -gt $((timeout * 4)) ] && die "not in sync after $timeout s (state $st, lag $lag; $sock)"
        sleep 0.25
    done
}

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
