#!/usr/bin/env bash
# Cost of asynchronous replication on the write path (issue 4): fio 4k randwrite qd32 through NBD
# on an agent that replicates to a target on loopback ("on") against the same binary and flags
# without replication ("off"), side by side, interleaved.
#
#   bash benches/repl_overhead.sh [--rounds N] [--quick] [--cache writeback|none] [--keep]
#
#   --rounds N   N runs each, off and on alternating, the order flipping every round (default 5)
#   --quick      3 s per run + 1 s ramp instead of 10 s + 2 s
#   --cache      the agents' cache mode (default: writeback, the agent's default)
#   --compression  the replicating agent's compression (lz4, the default; zstd; off)
#
# Environment: BLOCKFERRY (binary; default build/release/blockferry, built here unless set or
# NO_BUILD=1), BENCH_DIR (default /var/tmp/blockferry-repl_overhead), PORT_BASE (default 10950:
# two NBD ports and the target's QUIC port), SIZE (volume size, default 1G), RUNTIME / RAMP.
#
# Both volumes first get one 1M sequential pass over the whole volume (so the "on" replica holds
# data, the activity log is warm and the page cache state is alike), then the "on" agent is waited
# for until in sync. Before every run: sync, and the "on" agent in sync with lag 0, so that one
# run's replication backlog does not run during the next (how long it trailed after each of its
# runs is reported). Replication uses the defaults (async, --compression as given: lz4 by default; 256 MiB budget, 1 s epochs). The
# target runs on the same 2 cores: its CPU is part of the cost and is reported.
set -euo pipefail
NAME=repl_overhead
ROUNDS=5
QUICK=0
CACHE=writeback
COMPRESSION=lz4
KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS="$2"; shift ;;
        --quick) QUICK=1 ;;
        --cache) CACHE="$2"; shift ;;
        --compression) COMPRESSION="$2"; shift ;;
        --keep) KEEP=1 ;;
        -h|--help) sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "repl_overhead.sh: unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ "$QUICK" = 1 ]; then RUNTIME="${RUNTIME:-3}"; RAMP="${RAMP:-1}"; else RUNTIME="${RUNTIME:-10}"; RAMP="${RAMP:-2}"; fi
PORT_BASE="${PORT_BASE:-10950}"
SIZE="${SIZE:-1G}"
source "$(dirname "${BASH_SOURCE[0]}")/repl_common.sh"
need fio fio
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine (need fio >= 3.18 built with libnbd)"

OFF_PORT=$PORT_BASE; ON_PORT=$((PORT_BASE + 1)); QUIC_PORT=$((PORT_BASE + 2))
make_keys
for k in off on; do
    "$BF" volume create --dir "$BENCH_DIR/v-$k" --size "$SIZE" --name "$k" >/dev/null
    record "$BF" volume create --dir "$BENCH_DIR/v-$k" --size "$SIZE" --name "$k"
done
start_target target "$QUIC_PORT" "$BENCH_DIR/replicas"
start_agent off "$OFF_PORT" "$BENCH_DIR/v-off" --cache "$CACHE"
start_agent on "$ON_PORT" "$BENCH_DIR/v-on" --cache "$CACHE" --key-dir "$BENCH_DIR/keys-agent" \
    --target "127.0.0.1:$QUIC_PORT" --target-fingerprint "$TARGET_FP" --compression "$COMPRESSION"
declare -A PORT=([off]=$OFF_PORT [on]=$ON_PORT)
wait_in_sync "$BENCH_DIR/on.sock" 600

log "warm-up: one 1M sequential pass over each volume"
for k in off on; do
    fio --name=warm --ioengine=nbd --uri="nbd://127.0.0.1:${PORT[$k]}/$k" --rw=write --bs=1m --iodepth=8 \
        --size="$SIZE" --output-format=json --output="$OUT_DIR/warm.$k.json" >/dev/null || die "warm-up fio failed on $k"
done
wait_in_sync "$BENCH_DIR/on.sock" 600

TPID="${PID_OF[target]}"
for ((r = 1; r <= ROUNDS; r++)); do
    if [ $((r % 2)) = 1 ]; then order=(off on); else order=(on off); fi
    for k in "${order[@]}"; do
        sync
        wait_in_sync "$BENCH_DIR/on.sock" 600
        pid="${PID_OF[$k]}"
        log "4k randwrite qd32 on $k (round $r of $ROUNDS)"
        c0="$(proc_ticks "$pid")"; tc0="$(proc_ticks "$TPID")"
        cmd=(fio --name=randwrite --ioengine=nbd --uri="nbd://127.0.0.1:${PORT[$k]}/$k" --rw=randwrite --bs=4k
             --iodepth=32 --numjobs=1 --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" --randrepeat=0
             --output-format=json --output="$OUT_DIR/$k.r$r.json")
        [ "$r" = 1 ] && record "${cmd[@]}"
        "${cmd[@]}" >/dev/null || die "fio failed on $k"
        c1="$(proc_ticks "$pid")"; tc1="$(proc_ticks "$TPID")"
        st="-"; trail=0
        if [ "$k" = on ]; then
            st="$(rq field "$BENCH_DIR/on.sock" state) ovf=$(rq field "$BENCH_DIR/on.sock" overflows)"
            t0=$SECONDS; wait_in_sync "$BENCH_DIR/on.sock" 600; trail=$((SECONDS - t0))
        fi
        echo "$k $r $((c1 - c0)) $((tc1 - tc0)) $(getconf CLK_TCK) $((RUNTIME + RAMP)) $trail ${st// /_}" >> "$OUT_DIR/runs.txt"
    done
done

"$PY" - "$OUT_DIR" "$MD" "$ROUNDS" "$RUNTIME" "$RAMP" "$CACHE/compression $COMPRESSION" "$SIZE" "$REV" "$(loadavg)" "$((SECONDS - T_START))" <<'EOF'
import json, os, sys, datetime, statistics as st
out, md, rounds, runtime, ramp, cache, size, rev, load, took = sys.argv[1:11]
rounds = int(rounds)
runs = {}
for line in open(os.path.join(out, "runs.txt")):
    k, r, ticks, tticks, hz, secs, trail, state = line.split()
    j = json.load(open(os.path.join(out, f"{k}.r{r}.json")))["jobs"][0]["write"]
    runs[k, int(r)] = dict(iops=j["iops"], p99=j["clat_ns"]["percentile"].get("99.000000", 0) / 1000,
                           cpu=100 * int(ticks) / int(hz) / int(secs), tcpu=100 * int(tticks) / int(hz) / int(secs),
                           # CPU over ramp + run, per write at the run's rate over the same time
                           us=1e6 * int(ticks) / int(hz) / (j["iops"] * int(secs)),
                           tus=1e6 * int(tticks) / int(hz) / (j["iops"] * int(secs)),
                           trail=int(trail), state=state.replace("_", " "))
med = st.median
rows = [["replication", "IOPS (median)", "min-max IOPS", "p99 clat µs (median)", "agent CPU %", "target CPU %",
         "agent CPU µs/write", "target CPU µs/write",
         "trailing after run (s)", "state at end of run", "on/off per round"]]
per = [runs["on", r]["iops"] / runs["off", r]["iops"] for r in range(1, rounds + 1)]
for k in ("off", "on"):
    xs = [runs[k, r] for r in range(1, rounds + 1)]
    iops = [x["iops"] for x in xs]
    rows.append([k, f"{med(iops):,.0f}", f"{min(iops):,.0f}-{max(iops):,.0f}", f"{med([x['p99'] for x in xs]):,.0f}",
                 f"{med([x['cpu'] for x in xs]):.0f}", f"{med([x['tcpu'] for x in xs]):.0f}",
                 f"{med([x['us'] for x in xs]):.1f}", f"{med([x['tus'] for x in xs]):.1f}",
                 " ".join(str(x["trail"]) for x in xs) if k == "on" else "",
                 ", ".join(sorted(set(x["state"] for x in xs))) if k == "on" else "",
                 " ".join(f"{p:.2f}" for p in per) if k == "on" else ""])
ratio = med([runs["on", r]["iops"] for r in range(1, rounds + 1)]) / med([runs["off", r]["iops"] for r in range(1, rounds + 1)])

def text_table(rows):
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(["  ".join(c.rjust(w[i]) for i, c in enumerate(r)) for r in rows[:1]] +
                     ["  ".join("-" * x for x in w)] +
                     ["  ".join(c.rjust(w[i]) for i, c in enumerate(r)) for r in rows[1:]])

def md_table(rows):
    return "\n".join(["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---:" for _ in rows[0]) + "|"] +
                     ["| " + " | ".join(r) + " |" for r in rows[1:]])

when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
head = (f"{when}, blockferry {rev}, {os.cpu_count()} CPUs, {size} volumes, cache {cache}, fio nbd engine 4k randwrite "
        f"qd32, 1 connection, {runtime} s + {ramp} s ramp per run, {rounds} round(s) interleaved, took {took} s, "
        f"load average at end {load}")
verdict = f"on/off IOPS (ratio of medians): {ratio:.2f}x (target >= 0.85x); per round median {med(per):.2f}x"
print(); print(head); print(); print(text_table(rows)); print(); print(verdict)
with open(md, "w") as f:
    f.write(f"{head}\n\n{md_table(rows)}\n\n{verdict}\n")
EOF
echo
echo "commands:"
sed 's/^/  /' "$OUT_DIR/commands.txt"
echo "markdown: $MD; raw: $OUT_DIR"
