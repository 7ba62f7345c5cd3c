#!/usr/bin/env bash
# Incremental catch-up (issue 4): a replicated 4 GiB volume, 1% of its 4 KiB blocks changed at
# random while the link is down, then the time until the replica has them again; side by side
# with rsync --inplace --no-whole-file of the same before/after image over loopback.
#
#   bash benches/repl_catchup.sh [--rounds N] [--budget SIZE] [--keep]
#
#   --rounds N     changes + catch-up N times, blockferry and rsync alternating first (default 3)
#   --budget SIZE  the agent's epoch-buffer budget (default 256M, the agent's default: the 40 MiB of
#                  changes stay in the epoch buffer; 16M makes them overflow it, so the volume goes
#                  behind and catches up from the change-tracking bitmap, reading the image)
#   --keep         keep the work directory
#
# Environment: BLOCKFERRY (binary; default build/release/blockferry, built here unless set or
# NO_BUILD=1), BENCH_DIR (default /var/tmp/blockferry-repl_catchup; real disk, about 17 GiB free),
# PORT_BASE (default 10930: NBD, QUIC, proxy, rsync daemon), SIZE (default 4G), CHANGE_PERMILLE
# (default 10 = 1%).
#
# What one round does (all on 127.0.0.1):
#   1. (once) fills a 4 GiB volume with random data, starts a target and an agent that replicates
#      through `blockferry impair` (no impairment: it is there for its blackhole and byte counter)
#      with --compression off, and waits for the initial sync; an rsync daemon serves a copy of
#      the same image as its destination.
#   2. blackholes the link, writes 1% of the volume's 4 KiB blocks (distinct, at random, fresh
#      random data) through NBD with fio, waits 1 s, and heals the link;
#   3. blockferry: time from the heal until the agent reports in-sync with lag 0 (and, tighter,
#      until the target's committed epoch reached the final one), polled every 20 ms; bytes: the
#      agent's wire_bytes_sent delta (block payload + frame headers) and the proxy's UDP bytes
#      towards the target (QUIC, TLS, acks: everything), both from before the link went down;
#   4. rsync: `rsync --inplace --no-whole-file --ignore-times --stats SOURCE_IMAGE rsync://127.0.0.1:PORT/dst/image.raw`
#      to the daemon, whose file holds the previous state (it got it from the round before), timed;
#      bytes: rsync's own "sent + received".
#   The order of 3 and 4 alternates per round. At the end, source, replica and rsync destination are
#   compared with cmp.
set -euo pipefail
NAME=repl_catchup
ROUNDS=3
BUDGET=256M
KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS="$2"; shift ;;
        --budget) BUDGET="$2"; shift ;;
        --keep) KEEP=1 ;;
        -h|--help) sed -n '2,36p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "repl_catchup.sh: unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done
PORT_BASE="${PORT_BASE:-10930}"
SIZE="${SIZE:-4G}"
CHANGE_PERMILLE="${CHANGE_PERMILLE:-10}"
source "$(dirname "${BASH_SOURCE[0]}")/repl_common.sh"
need fio fio
need rsync rsync
need cmp diffutils
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine (need fio >= 3.18 built with libnbd)"

NBD_PORT=$PORT_BASE; QUIC_PORT=$((PORT_BASE + 1)); PROXY_PORT=$((PORT_BASE + 2)); RSYNC_PORT=$((PORT_BASE + 3))
for p in $NBD_PORT $RSYNC_PORT; do port_busy "$p" && die "port $p is in use (set PORT_BASE)"; done

log "making a $SIZE image of random data in $BENCH_DIR ($fstype)"
head -c "$SIZE" /dev/urandom > "$BENCH_DIR/base.raw"
size_bytes="$(stat -c %s "$BENCH_DIR/base.raw")"
blocks=$((size_bytes / 4096))
nchange=$(((blocks * CHANGE_PERMILLE + 500) / 1000))
changed_bytes=$((nchange * 4096))
"$BF" volume create --dir "$BENCH_DIR/src" --size "$size_bytes" --name vol >/dev/null
record "$BF" volume create --dir "$BENCH_DIR/src" --size "$size_bytes" --name vol
cp "$BENCH_DIR/base.raw" "$BENCH_DIR/src/image.raw"
mkdir -p "$BENCH_DIR/rsync-dst"
cp "$BENCH_DIR/base.raw" "$BENCH_DIR/rsync-dst/image.raw"
rm -f "$BENCH_DIR/base.raw"
sync

make_keys
start_target target "$QUIC_PORT" "$BENCH_DIR/replicas"
start_impair proxy "$PROXY_PORT" "$QUIC_PORT"
start_agent agent "$NBD_PORT" "$BENCH_DIR/src" --key-dir "$BENCH_DIR/keys-agent" \
    --target "127.0.0.1:$PROXY_PORT" --target-fingerprint "$TARGET_FP" --compression off --budget "$BUDGET"
ASOCK="$BENCH_DIR/agent.sock"; TSOCK="$BENCH_DIR/target.sock"; PSOCK="$BENCH_DIR/proxy.sock"
log "initial sync of $SIZE (waiting for in-sync)"
t=$SECONDS
wait_in_sync "$ASOCK" 1800
log "initial sync done in $((SECONDS - t)) s"

cat > "$BENCH_DIR/rsyncd.conf" <<EOF
use chroot = no
pid file = $BENCH_DIR/rsyncd.pid
log file = $OUT_DIR/rsyncd.log
[dst]
path = $BENCH_DIR/rsync-dst
read only = false
uid = 0
gid = 0
EOF
rsync --daemon --no-detach --config="$BENCH_DIR/rsyncd.conf" --address=127.0.0.1 --port="$RSYNC_PORT" &
PID_OF[rsyncd]=$!; PIDS+=("$!")
record rsync --daemon --no-detach --config=rsyncd.conf --address=127.0.0.1 --port="$RSYNC_PORT" "# rsyncd.conf: use chroot = no; [dst] path = DIR, read only = false"
t=0; while ! port_busy "$RSYNC_PORT"; do t=$((t + 1)); [ "$t" -gt 100 ] && die "rsync daemon not up"; sleep 0.1; done

wire() { rq field "$ASOCK" wire_bytes_sent; }
proxy_up() { rq impair "$PSOCK" stats | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["up"]["forwarded_bytes"])'; }

# Byte counters are read before the link goes down: what the agent wrote into the blackhole is
# counted when it is sent (QUIC resends it after the heal, which only the proxy sees), and the
# proxy does not count what the blackhole dropped.
run_blockferry() {
    local r="$1" w0 p0 t0 res w1 p1
    read -r w0 p0 < "$OUT_DIR/counters.r$r"
    t0="$("$PY" -c 'import time; print(time.time())')"
    rq impair "$PSOCK" blackhole off >/dev/null
    res="$(rq wait-sync "$ASOCK" "$TSOCK" "$t0" 600)" || die "round $r: no in-sync after 600 s: $res"
    w1="$(wire)"; p1="$(proxy_up)"
    echo "$res" > "$OUT_DIR/bf.r$r.json"
    echo "$r $((w1 - w0)) $((p1 - p0)) $t0" >> "$OUT_DIR/bf-bytes.txt"
    log "round $r blockferry: $(echo "$res" | "$PY" -c 'import json,sys; d=json.load(sys.stdin); print("in sync after %.2f s (target committed at %.2f s)" % (d["agent_in_sync_s"], d["target_committed_s"]))'), wire $((w1 - w0)) B, UDP $((p1 - p0)) B"
}

run_rsync() {
    local r="$1" t0 t1
    sync
    t0="$(date +%s.%N)"
    rsync --inplace --no-whole-file --ignore-times --stats "$BENCH_DIR/src/image.raw" "rsync://127.0.0.1:$RSYNC_PORT/dst/image.raw" \
        > "$OUT_DIR/rsync.r$r.txt" 2>&1 || { cat "$OUT_DIR/rsync.r$r.txt" >&2; die "rsync failed"; }
    t1="$(date +%s.%N)"
    echo "$r $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')" >> "$OUT_DIR/rsync-time.txt"
    log "round $r rsync: $(tail -1 "$OUT_DIR/rsync-time.txt" | cut -d' ' -f2) s"
}
record rsync --inplace --no-whole-file --ignore-times --stats SRC/image.raw "rsync://127.0.0.1:$RSYNC_PORT/dst/image.raw"

for ((r = 1; r <= ROUNDS; r++)); do
    log "round $r of $ROUNDS: link down, changing $nchange blocks ($changed_bytes bytes) through NBD"
    echo "$(wire) $(proxy_up)" > "$OUT_DIR/counters.r$r"
    rq impair "$PSOCK" blackhole on >/dev/null
    fio_cmd=(fio --name=change --ioengine=nbd --uri="nbd://127.0.0.1:$NBD_PORT/vol" --rw=randwrite --bs=4k
             --iodepth=32 --number_ios="$nchange" --size="$size_bytes" --refill_buffers --randseed="$((1000 + r))"
             --output-format=json --output="$OUT_DIR/fio.r$r.json")
    [ "$r" = 1 ] && record "${fio_cmd[@]}" "(blackhole on before, off after)"
    "${fio_cmd[@]}" >/dev/null || die "fio failed (round $r)"
    nw="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["jobs"][0]["write"]["total_ios"])' "$OUT_DIR/fio.r$r.json")"
    [ "$nw" = "$nchange" ] || die "fio wrote $nw blocks, not $nchange"
    sleep 1
    echo "$r $(rq field "$ASOCK" state) $(rq field "$ASOCK" lag_bytes) $(rq field "$ASOCK" buffered_bytes)" >> "$OUT_DIR/before-heal.txt"
    if [ $((r % 2)) = 1 ]; then run_blockferry "$r"; run_rsync "$r"; else run_rsync "$r"; run_blockferry "$r"; fi
done

log "comparing source, replica and rsync destination"
REPLICA="$(rq field "$TSOCK" replica_path)"
same_replica=no; same_rsync=no
cmp -s "$BENCH_DIR/src/image.raw" "$REPLICA" && same_replica=yes
cmp -s "$BENCH_DIR/src/image.raw" "$BENCH_DIR/rsync-dst/image.raw" && same_rsync=yes

"$PY" - "$OUT_DIR" "$MD" "$ROUNDS" "$changed_bytes" "$nchange" "$SIZE" "$BUDGET" "$REV" "$(loadavg)" "$same_replica" "$same_rsync" "$((SECONDS - T_START))" <<'EOF'
import json, os, sys, datetime, statistics as st
out, md, rounds, changed, nchange, size, budget, rev, load, same_rep, same_rs, took = sys.argv[1:13]
rounds, changed = int(rounds), int(changed)
bfb = {int(l.split()[0]): (int(l.split()[1]), int(l.split()[2])) for l in open(os.path.join(out, "bf-bytes.txt"))}
heal = {int(l.split()[0]): float(l.split()[3]) for l in open(os.path.join(out, "bf-bytes.txt"))}
# When the agent (re)connected: its log's "connected" lines (UTC timestamps, exact), not the
# status (published at most every 200 ms).
connects = []
for line in open(os.path.join(out, "agent.log")):
    if "shipper: connected" in line:
        connects.append(datetime.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp())
rst = {int(l.split()[0]): float(l.split()[1]) for l in open(os.path.join(out, "rsync-time.txt"))}
rows = [["round", "link", "heal -> connected s", "connected -> in sync s", "heal -> in sync s", "rsync s",
         "rsync / bf (from connect)", "rsync / bf (from heal)", "bf wire B", "wire / changed", "UDP B (proxy)",
         "UDP / changed", "rsync sent+recv B"]]
cs, hs, rs_s, wr, ur, rsr = [], [], [], [], [], []
for r in range(1, rounds + 1):
    d = json.load(open(os.path.join(out, f"bf.r{r}.json")))
    txt = open(os.path.join(out, f"rsync.r{r}.txt")).read()
    def stat(label):
        for line in txt.splitlines():
            if line.startswith(label):
                return int(line.split(":")[1].split()[0].replace(",", ""))
        return 0
    rsb = stat("Total bytes sent") + stat("Total bytes received")
    w, u = bfb[r]
    h, t = d["agent_in_sync_s"], rst[r]
    # A new connection (the old one timed out, or an overflow restarted the session): the catch-up
    # starts when it is up; otherwise the connection survived and the catch-up starts at the heal.
    after = [x - heal[r] for x in connects if heal[r] < x < heal[r] + h]
    conn = after[0] if after else 0.0
    link = "reconnected" if after else "survived"
    c = h - conn
    cs.append(c); hs.append(h); rs_s.append(t)
    wr.append(w / changed); ur.append(u / changed); rsr.append(rsb / changed)
    rows.append([str(r), link, f"{conn:.2f}", f"{c:.2f}", f"{h:.2f}", f"{t:.2f}", f"{t / c:.0f}x", f"{t / h:.1f}x",
                 f"{w:,}", f"{w / changed:.3f}", f"{u:,}", f"{u / changed:.3f}", f"{rsb:,}"])
med = st.median
rows.append(["median", "", "", f"{med(cs):.2f}", f"{med(hs):.2f}", f"{med(rs_s):.2f}",
             f"{med(rs_s) / med(cs):.0f}x", f"{med(rs_s) / med(hs):.1f}x", "", f"{med(wr):.3f}", "", f"{med(ur):.3f}", ""])

def text_table(rows):
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(["  ".join(c.rjust(w[i]) for i, c in enumerate(r)) for r in rows[:1]] +
                     ["  ".join("-" * x for x in w)] +
                     ["  ".join(c.rjust(w[i]) for i, c in enumerate(r)) for r in rows[1:]])

def md_table(rows):
    return "\n".join(["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---:" for _ in rows[0]) + "|"] +
                     ["| " + " | ".join(r) + " |" for r in rows[1:]])

when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
head = (f"{when}, blockferry {rev}, {os.cpu_count()} CPUs, {size} volume of random data, {int(nchange):,} blocks "
        f"of 4 KiB changed per round ({changed:,} bytes), --compression off --budget {budget}, {rounds} round(s), "
        f"took {took} s, load average at end {load}")
verdict = (f"speed, median rsync time / median blockferry time: {med(rs_s) / med(cs):.0f}x from the (re)connection, "
           f"{med(rs_s) / med(hs):.1f}x from the heal (target >= 20x); "
           f"wire bytes / changed bytes: {med(wr):.3f} (agent's count), {med(ur):.3f} (UDP at the proxy) "
           f"(target <= 1.1); source == replica: {same_rep}; source == rsync destination: {same_rs}")
print(); print(head); print(); print(text_table(rows)); print(); print(verdict)
with open(md, "w") as f:
    f.write(f"{head}\n\n{md_table(rows)}\n\n{verdict}\n")
EOF
echo
echo "commands:"
sed 's/^/  /' "$OUT_DIR/commands.txt"
echo "markdown: $MD; raw: $OUT_DIR"
