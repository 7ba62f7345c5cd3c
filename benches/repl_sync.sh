#!/usr/bin/env bash
# Cost of synchronous replication (issue 5): fio through NBD on three agents with identical
# volumes, side by side in one run: "local" (no replication), "async" and "sync" (both to one
# target on loopback, a separate process). Then the sync volume through `blockferry impair` at
# 2 ms and 20 ms RTT, to show how sync latency follows the round trip.
#
#   bash benches/repl_sync.sh [--rounds N] [--quick] [--no-wan] [--keep]
#
#   --rounds N   N runs of every workload on every agent, interleaved, the order rotating
#                (default 3); each cell is the median run
#   --quick      3 s per run + 1 s ramp instead of 10 s + 2 s
#   --no-wan     skip the runs through the proxy
#
# Workloads (fio nbd engine, one connection): 4k randwrite qd1 (latency), 4k randwrite qd32
# (IOPS), 1M sequential write qd8 (bandwidth). Before each run: `sync`, and the replicated
# agents in sync with lag 0. The target's disk is measured too: fio 4k writes with
# --fdatasync=1 in the target's directory, whose fdatasync median is the cost a sync write adds
# at the very least. Targets checked: sync qd32 IOPS >= 0.6x async; sync qd1 median latency <=
# local qd1 median + the target's fdatasync median + 0.3 ms.
#
# Environment: BLOCKFERRY (binary; default build/release/blockferry, built here unless set or
# NO_BUILD=1), BENCH_DIR (default /var/tmp/blockferry-repl_sync), PORT_BASE (default 10930: three
# NBD ports, the target's QUIC port, the proxy, the WAN agent's NBD port), SIZE (default 1G),
# RUNTIME / RAMP.
set -euo pipefail
NAME=repl_sync
ROUNDS=3
QUICK=0
WAN=1
KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS="$2"; shift ;;
        --quick) QUICK=1 ;;
        --no-wan) WAN=0 ;;
        --keep) KEEP=1 ;;
        -h|--help) sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "repl_sync.sh: unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ "$QUICK" = 1 ]; then RUNTIME="${RUNTIME:-3}"; RAMP="${RAMP:-1}"; else RUNTIME="${RUNTIME:-10}"; RAMP="${RAMP:-2}"; fi
PORT_BASE="${PORT_BASE:-10930}"
SIZE="${SIZE:-1G}"
source "$(dirname "${BASH_SOURCE[0]}")/repl_common.sh"
need fio fio
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine (need fio >= 3.18 built with libnbd)"
"$BF" agent --help | grep -q -- "--on-disconnect" || die "$BIN has no sync mode (issue 5)"

declare -A PORT=([local]=$PORT_BASE [async]=$((PORT_BASE + 1)) [sync]=$((PORT_BASE + 2)) [wan]=$((PORT_BASE + 5)))
QUIC_PORT=$((PORT_BASE + 3)); PROXY_PORT=$((PORT_BASE + 4))
AGENTS=(local async sync)
make_keys
for k in "${AGENTS[@]}" wan; do
    "$BF" volume create --dir "$BENCH_DIR/v-$k" --size "$SIZE" --name "$k" >/dev/null
    record "$BF" volume create --dir "$BENCH_DIR/v-$k" --size "$SIZE" --name "$k"
done
start_target target "$QUIC_PORT" "$BENCH_DIR/replicas"
REPL=(--key-dir "$BENCH_DIR/keys-agent" --target-fingerprint "$TARGET_FP")
start_agent local "${PORT[local]}" "$BENCH_DIR/v-local"
start_agent async "${PORT[async]}" "$BENCH_DIR/v-async" "${REPL[@]}" --target "127.0.0.1:$QUIC_PORT" --mode async
start_agent sync "${PORT[sync]}" "$BENCH_DIR/v-sync" "${REPL[@]}" --target "127.0.0.1:$QUIC_PORT" --mode sync
wait_in_sync "$BENCH_DIR/async.sock" 600
wait_in_sync "$BENCH_DIR/sync.sock" 600

log "warm-up: one 1M sequential pass over each volume"
for k in "${AGENTS[@]}"; do
    fio --name=warm --ioengine=nbd --uri="nbd://127.0.0.1:${PORT[$k]}/$k" --rw=write --bs=1m --iodepth=8 \
        --size="$SIZE" --output-format=json --output="$OUT_DIR/warm.$k.json" >/dev/null || die "warm-up fio failed on $k"
done

settle() {
    sync
    wait_in_sync "$BENCH_DIR/async.sock" 600
    wait_in_sync "$BENCH_DIR/sync.sock" 600
}
# After the warm-up's writeback has drained (a probe during it measured 5.9 ms, not 0.13).
settle
log "the target's disk: 4k writes with fdatasync after each, in the target's directory"
FDT="$BENCH_DIR/replicas/fdatasync-probe"
mkdir -p "$FDT"
cmd=(fio --name=fdatasync --directory="$FDT" --rw=write --bs=4k --size=256m --fdatasync=1 --ioengine=psync
     --time_based --runtime="$RUNTIME" --output-format=json --output="$OUT_DIR/fdatasync.json")
record "${cmd[@]}"
"${cmd[@]}" >/dev/null || die "fdatasync fio failed"
rm -rf "$FDT"

declare -A RW=([qd1]=randwrite [qd32]=randwrite [seq]=write)
declare -A BS=([qd1]=4k [qd32]=4k [seq]=1m)
declare -A QD=([qd1]=1 [qd32]=32 [seq]=8)
WORKLOADS=(qd1 qd32 seq)
# run_fio AGENT WORKLOAD TAG: one fio run into $OUT_DIR/TAG.json
run_fio() {
    local k="$1" wl="$2" tag="$3"
    local cmd=(fio --name="$wl" --ioengine=nbd --uri="nbd://127.0.0.1:${PORT[$k]}/$k" --rw="${RW[$wl]}"
               --bs="${BS[$wl]}" --iodepth="${QD[$wl]}" --numjobs=1 --time_based --runtime="$RUNTIME"
               --ramp_time="$RAMP" --randrepeat=0 --size="$SIZE" --output-format=json --output="$OUT_DIR/$tag.json")
    record "${cmd[@]}"
    "${cmd[@]}" >/dev/null || die "fio failed: ${cmd[*]}"
}
n=0
for wl in "${WORKLOADS[@]}"; do
    for ((r = 1; r <= ROUNDS; r++)); do
        # rotate the order every round so that drift on the machine hits every agent alike
        order=("${AGENTS[@]:$(( (n) % 3 ))}" "${AGENTS[@]:0:$(( (n) % 3 ))}")
        n=$((n + 1))
        for k in "${order[@]}"; do
            settle
            log "$wl on $k (round $r of $ROUNDS)"
            run_fio "$k" "$wl" "$wl.$k.r$r"
        done
    done
done

if [ "$WAN" = 1 ]; then
    stop sync
    start_impair proxy "$PROXY_PORT" "$QUIC_PORT" --delay 1ms
    start_agent wan "${PORT[wan]}" "$BENCH_DIR/v-wan" "${REPL[@]}" --target "127.0.0.1:$PROXY_PORT" --mode sync
    wait_in_sync "$BENCH_DIR/wan.sock" 600
    for d in 1 10; do
        rq impair "$BENCH_DIR/proxy.sock" delay "$d" >/dev/null
        rtt=$((2 * d))
        for ((r = 1; r <= ROUNDS; r++)); do
            sync
            wait_in_sync "$BENCH_DIR/wan.sock" 600
            log "qd1 sync through the proxy, ${rtt} ms RTT (round $r of $ROUNDS)"
            run_fio wan qd1 "wan${rtt}.r$r"
        done
    done
fi

"$PY" - "$OUT_DIR" "$ROUNDS" "$WAN" "$MD" <<'EOF'
import json, os, statistics, sys
out, rounds, wan, md = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]

def job(tag):
    return json.load(open(os.path.join(out, tag + ".json")))["jobs"][0]

def stats(tag):
    j = job(tag)
    w = j["write"]
    p = w["clat_ns"].get("percentile", {})
    return {"iops": w["iops"], "mibs": w["bw"] / 1024, "p50": p.get("50.000000", 0) / 1000,
            "p99": p.get("99.000000", 0) / 1000}

def med(rows, key):
    return statistics.median(r[key] for r in rows)

f = job("fdatasync")["sync"]["lat_ns"]
fd50 = f["percentile"]["50.000000"] / 1000
fd99 = f["percentile"]["99.000000"] / 1000
labels = {"qd1": "4k randwrite qd1", "qd32": "4k randwrite qd32", "seq": "1M seq write qd8"}
lines = []
lines.append(f"target disk: fdatasync of a 4 KiB write, median {fd50:.0f} µs, p99 {fd99:.0f} µs")
lines.append("")
lines.append("| workload | replication | IOPS (median) | min-max IOPS | MiB/s | p50 clat µs | p99 clat µs |")
lines.append("|---|---|---:|---:|---:|---:|---:|")
cells = {}
for wl in ("qd1", "qd32", "seq"):
    for k in ("local", "async", "sync"):
        rows = [stats(f"{wl}.{k}.r{r}") for r in range(1, rounds + 1)]
        c = {key: med(rows, key) for key in ("iops", "mibs", "p50", "p99")}
        c["min"] = min(r["iops"] for r in rows)
        c["max"] = max(r["iops"] for r in rows)
        cells[(wl, k)] = c
        lines.append(f"| {labels[wl]} | {k} | {c['iops']:,.0f} | {c['min']:,.0f}-{c['max']:,.0f} | "
                     f"{c['mibs']:,.1f} | {c['p50']:,.0f} | {c['p99']:,.0f} |")
if wan:
    for rtt in (2, 20):
        rows = [stats(f"wan{rtt}.r{r}") for r in range(1, rounds + 1)]
        c = {key: med(rows, key) for key in ("iops", "mibs", "p50", "p99")}
        lines.append(f"| 4k randwrite qd1 | sync, {rtt} ms RTT (impair) | {c['iops']:,.0f} | "
                     f"{min(r['iops'] for r in rows):,.0f}-{max(r['iops'] for r in rows):,.0f} | "
                     f"{c['mibs']:,.1f} | {c['p50']:,.0f} | {c['p99']:,.0f} |")
lines.append("")
ratio = cells[("qd32", "sync")]["iops"] / cells[("qd32", "async")]["iops"]
lines.append(f"sync / async, 4k randwrite qd32 IOPS: {ratio:.2f}x (target >= 0.6x): "
             f"{'met' if ratio >= 0.6 else 'NOT met'}")
bound = cells[("qd1", "local")]["p50"] + fd50 + 300
s50 = cells[("qd1", "sync")]["p50"]
lines.append(f"sync qd1 median latency {s50:.0f} µs; bound = local median "
             f"{cells[('qd1', 'local')]['p50']:.0f} + fdatasync median {fd50:.0f} + 300 = {bound:.0f} µs: "
             f"{'met' if s50 <= bound else 'NOT met'}")
text = "\n".join(lines)
print(text)
with open(md, "w") as fh:
    fh.write(text + "\n")
EOF
log "took $((SECONDS - T_START)) s; markdown: $MD"
echo
echo "commands:"
sed 's/^/  /' "$OUT_DIR/commands.txt"
