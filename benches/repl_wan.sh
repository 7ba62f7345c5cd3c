#!/usr/bin/env bash
# Replication over a WAN (issue 4): agent -> `blockferry impair` (20 ms each way = 40 ms RTT, a
# 100 Mbit/s bottleneck each way, 1 MiB queue) -> target, all on 127.0.0.1.
#   (a) throughput: fio writes sequential 1M blocks faster than the link (RATE_FAST, default 25
#       MB/s = 2x the link) for 30 s; throughput at the target = UDP bytes the proxy forwarded
#       towards the target per second (and the agent's wire_bytes_sent: block payload + frame
#       headers), over the run after the first 5 s; against the link's 12.5 MB/s.
#   (b) RPO: fio 4k random writes at RATE_SLOW (default 6 MB/s, under the link) for 60 s; the
#       agent's rpo_seconds sampled every 0.5 s; max and p99.
#
#   bash benches/repl_wan.sh [--rounds N] [--keep]
#
#   --rounds N   (a) and (b) alternate N times each (default 2)
#
# Environment: BLOCKFERRY (binary; default build/release/blockferry, built here unless set or
# NO_BUILD=1), BENCH_DIR (default /var/tmp/blockferry-repl_wan), PORT_BASE (default 10970: NBD,
# QUIC, proxy), SIZE (volume, default 4G), RUN_A / RUN_B (seconds, 30 / 60), RATE_FAST, RATE_SLOW
# (fio --rate values), EPOCH_MS (agent --epoch-interval-ms, default: the agent's default, 1000).
#
# Replication: --compression off (so that the link carries what was written), default budget
# (256 MiB) and epochs. After each (a) run the backlog is drained with the proxy's rate limit
# lifted (`rate off`, then `rate 100mbit` again once in sync), so each run starts in sync.
set -euo pipefail
NAME=repl_wan
ROUNDS=2
KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS="$2"; shift ;;
        --keep) KEEP=1 ;;
        -h|--help) sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "repl_wan.sh: unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done
PORT_BASE="${PORT_BASE:-10970}"
SIZE="${SIZE:-4G}"
RUN_A="${RUN_A:-30}"; RUN_B="${RUN_B:-60}"
RATE_FAST="${RATE_FAST:-25m}"; RATE_SLOW="${RATE_SLOW:-6m}"
LINK_BITS=100000000
source "$(dirname "${BASH_SOURCE[0]}")/repl_common.sh"
need fio fio
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine (need fio >= 3.18 built with libnbd)"

NBD_PORT=$PORT_BASE; QUIC_PORT=$((PORT_BASE + 1)); PROXY_PORT=$((PORT_BASE + 2))
make_keys
"$BF" volume create --dir "$BENCH_DIR/src" --size "$SIZE" --name vol >/dev/null
record "$BF" volume create --dir "$BENCH_DIR/src" --size "$SIZE" --name vol
start_target target "$QUIC_PORT" "$BENCH_DIR/replicas"
start_impair proxy "$PROXY_PORT" "$QUIC_PORT" --delay 20ms --rate 100mbit
epoch_args=(); [ -n "${EPOCH_MS:-}" ] && epoch_args=(--epoch-interval-ms "$EPOCH_MS")
start_agent agent "$NBD_PORT" "$BENCH_DIR/src" --key-dir "$BENCH_DIR/keys-agent" \
    --target "127.0.0.1:$PROXY_PORT" --target-fingerprint "$TARGET_FP" --compression off "${epoch_args[@]}"
ASOCK="$BENCH_DIR/agent.sock"; PSOCK="$BENCH_DIR/proxy.sock"
wait_in_sync "$ASOCK" 600

up_bytes() { rq impair "$PSOCK" stats | "$PY" -c 'import json,sys; d=json.load(sys.stdin)["up"]; print(d["forwarded_bytes"], d["dropped"]["queue"])'; }
now() { "$PY" -c 'import time; print(time.time())'; }

run_a() {
    local r="$1"
    local cmd=(fio --name=seq --ioengine=nbd --uri="nbd://127.0.0.1:$NBD_PORT/vol" --rw=write --bs=1m --iodepth=8
               --rate="$RATE_FAST" --time_based --runtime="$RUN_A" --size="$SIZE" --refill_buffers
               --output-format=json --output="$OUT_DIR/a.r$r.json")
    [ "$r" = 1 ] && record "${cmd[@]}"
    rq sample "$ASOCK" 0.5 "$((RUN_A + 1))" "$OUT_DIR/a.r$r.samples" &
    local sp=$!
    "${cmd[@]}" >/dev/null &
    local fp=$!
    sleep 5
    local t0 p0 w0 t1 p1 w1
    t0="$(now)"; read -r p0 q0 < <(up_bytes); w0="$(rq field "$ASOCK" wire_bytes_sent)"
    sleep "$((RUN_A - 6))"
    t1="$(now)"; read -r p1 q1 < <(up_bytes); w1="$(rq field "$ASOCK" wire_bytes_sent)"
    wait "$fp" || die "fio failed (a, round $r)"
    wait "$sp" || true
    echo "$r $t0 $t1 $p0 $p1 $w0 $w1 $q0 $q1 $(rq field "$ASOCK" state) $(rq field "$ASOCK" overflows)" >> "$OUT_DIR/a.txt"
    log "round $r (a): UDP up $(awk -v a="$p0" -v b="$p1" -v s="$t0" -v e="$t1" 'BEGIN { printf "%.2f MB/s", (b - a) / (e - s) / 1e6 }'), agent wire $(awk -v a="$w0" -v b="$w1" -v s="$t0" -v e="$t1" 'BEGIN { printf "%.2f MB/s", (b - a) / (e - s) / 1e6 }')"
    log "draining the backlog with the link's rate limit lifted"
    rq impair "$PSOCK" rate off >/dev/null
    wait_in_sync "$ASOCK" 900
    rq impair "$PSOCK" rate 100mbit >/dev/null
    sleep 2
}

run_b() {
    local r="$1"
    local cmd=(fio --name=rand --ioengine=nbd --uri="nbd://127.0.0.1:$NBD_PORT/vol" --rw=randwrite --bs=4k --iodepth=4
               --rate="$RATE_SLOW" --time_based --runtime="$RUN_B" --size="$SIZE" --randrepeat=0 --refill_buffers
               --output-format=json --output="$OUT_DIR/b.r$r.json")
    [ "$r" = 1 ] && record "${cmd[@]}"
    rq sample "$ASOCK" 0.5 "$RUN_B" "$OUT_DIR/b.r$r.samples" &
    local sp=$!
    "${cmd[@]}" >/dev/null || die "fio failed (b, round $r)"
    wait "$sp" || true
    wait_in_sync "$ASOCK" 300
    log "round $r (b): max RPO $(awk 'BEGIN { m = 0 } $2 > m { m = $2 } END { print m }' "$OUT_DIR/b.r$r.samples") s"
}
record "(sampling: GET /v1/status on the agent's admin socket every 0.5 s; proxy: 'stats' on its control socket)"

for ((r = 1; r <= ROUNDS; r++)); do
    if [ $((r % 2)) = 1 ]; then log "round $r: (a) then (b)"; run_a "$r"; run_b "$r"
    else log "round $r: (b) then (a)"; run_b "$r"; run_a "$r"; fi
done

"$PY" - "$OUT_DIR" "$MD" "$ROUNDS" "$RUN_A" "$RUN_B" "$RATE_FAST" "$RATE_SLOW" "$LINK_BITS" "$REV" "$(loadavg)" "$((SECONDS - T_START))" "${EPOCH_MS:-default (1000)}" <<'EOF'
import json, os, sys, datetime, statistics as st
out, md, rounds, run_a, run_b, fast, slow, link, rev, load, took, epoch = sys.argv[1:13]
rounds, link = int(rounds), int(link) / 8
med = st.median
arows = [["round", "fio write MB/s", "UDP to target MB/s", "of link", "agent wire MB/s", "of link", "queue drops", "state at end"]]
udp, wire = [], []
for line in open(os.path.join(out, "a.txt")):
    r, t0, t1, p0, p1, w0, w1, q0, q1, state, ovf = line.split()
    dt = float(t1) - float(t0)
    u, w = (int(p1) - int(p0)) / dt, (int(w1) - int(w0)) / dt
    udp.append(u); wire.append(w)
    fw = json.load(open(os.path.join(out, f"a.r{r}.json")))["jobs"][0]["write"]["bw_bytes"]
    arows.append([r, f"{fw / 1e6:.1f}", f"{u / 1e6:.2f}", f"{100 * u / link:.1f}%", f"{w / 1e6:.2f}", f"{100 * w / link:.1f}%",
                  str(int(q1) - int(q0)), f"{state} (overflows {ovf})"])
brows = [["round", "fio write MB/s", "samples", "max RPO s", "p99 RPO s", "median RPO s", "states seen"]]
mx, p99s = [], []
for r in range(1, rounds + 1):
    s = [l.split() for l in open(os.path.join(out, f"b.r{r}.samples"))]
    rpo = sorted(float(x[1]) for x in s)
    p99 = rpo[min(len(rpo) - 1, int(0.99 * len(rpo)))]
    mx.append(rpo[-1]); p99s.append(p99)
    fw = json.load(open(os.path.join(out, f"b.r{r}.json")))["jobs"][0]["write"]["bw_bytes"]
    brows.append([str(r), f"{fw / 1e6:.2f}", str(len(rpo)), f"{rpo[-1]:.2f}", f"{p99:.2f}", f"{med(rpo):.2f}",
                  ", ".join(sorted(set(x[3] for x in s)))])

def text_table(rows):
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(["  ".join(c.rjust(w[i]) for i, c in enumerate(r)) for r in rows[:1]] +
                     ["  ".join("-" * x for x in w)] +
                     ["  ".join(c.rjust(w[i]) for i, c in enumerate(r)) for r in rows[1:]])

def md_table(rows):
    return "\n".join(["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---:" for _ in rows[0]) + "|"] +
                     ["| " + " | ".join(r) + " |" for r in rows[1:]])

when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
head = (f"{when}, blockferry {rev}, {os.cpu_count()} CPUs, blockferry impair --delay 20ms --rate 100mbit (40 ms RTT, "
        f"12.5 MB/s each way), --compression off, epoch interval {epoch} ms, (a) fio 1M seq write --rate={fast} for "
        f"{run_a} s, (b) fio 4k randwrite --rate={slow} for {run_b} s, {rounds} round(s), took {took} s, load average at end {load}")
verdict = (f"(a) throughput at the target, median: {100 * med(udp) / link:.1f}% of the link in UDP bytes, "
           f"{100 * med(wire) / link:.1f}% in replicated block bytes + frame headers (target >= 85%); "
           f"(b) RPO: max {max(mx):.2f} s, p99 {med(p99s):.2f} s (median of rounds) (target < 2 s)")
print(); print(head); print(); print(text_table(arows)); print(); print(text_table(brows)); print(); print(verdict)
with open(md, "w") as f:
    f.write(f"{head}\n\n(a) throughput, from 5 s after the start to 1 s before the end:\n\n{md_table(arows)}\n\n"
            f"(b) RPO, sampled every 0.5 s:\n\n{md_table(brows)}\n\n{verdict}\n")
EOF
echo
echo "commands:"
sed 's/^/  /' "$OUT_DIR/commands.txt"
echo "markdown: $MD; raw: $OUT_DIR"
