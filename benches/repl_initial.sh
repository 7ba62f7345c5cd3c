#!/usr/bin/env bash
# Initial sync of a new replica (issue 4): a 4 GiB image, half random data and half zeros in
# alternating 64 MiB regions, copied to an empty destination by blockferry (agent -> target over
# QUIC on loopback), by nbdcopy (qemu-nbd serving the image -> a local file) and by rsync (local,
# --sparse), side by side, interleaved.
#
#   bash benches/repl_initial.sh [--rounds N] [--zeros holes|written] [--keep]
#
#   --rounds N   every tool N times, the order rotating per round (default 3)
#   --zeros      the zero regions are holes in the sparse image (default) or written zeros
#                (allocated: every tool must read them to know)
#
# Environment: BLOCKFERRY (binary; default build/release/blockferry, built here unless set or
# NO_BUILD=1), BENCH_DIR (default /var/tmp/blockferry-repl_initial; real disk, ~ 12 GiB free),
# PORT_BASE (default 10960: NBD of the agent, QUIC, qemu-nbd), SIZE (default 4G), REGION (default
# 64M).
#
# Each run starts from a fresh copy of the image (blockferry: a new volume, so a new replica and a
# new replication bitmap; the others: a new destination file), `sync`, and the source's pages
# dropped from the page cache (POSIX_FADV_DONTNEED via dd iflag=nocache), so every tool reads the
# source from the disk. Times: blockferry from starting the agent (the target runs already) until
# it reports in-sync with lag 0 (polled every 20 ms; the target has committed and fsynced it);
# nbdcopy and rsync wall time of the command (they do not fsync). blockferry runs with
# --compression off, so its wire bytes beyond the random half are what the zero half and the
# framing cost.
set -euo pipefail
NAME=repl_initial
ROUNDS=3
ZEROS=holes
KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS="$2"; shift ;;
        --zeros) ZEROS="$2"; shift ;;
        --keep) KEEP=1 ;;
        -h|--help) sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "repl_initial.sh: unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done
case "$ZEROS" in holes|written) ;; *) echo "repl_initial.sh: --zeros holes|written" >&2; exit 2 ;; esac
PORT_BASE="${PORT_BASE:-10960}"
SIZE="${SIZE:-4G}"
REGION="${REGION:-64M}"
source "$(dirname "${BASH_SOURCE[0]}")/repl_common.sh"
need rsync rsync
need nbdcopy libnbd-bin
need qemu-nbd qemu-utils
need cmp diffutils

NBD_PORT=$PORT_BASE; QUIC_PORT=$((PORT_BASE + 1)); QNBD_PORT=$((PORT_BASE + 2))
to_bytes() { numfmt --from=iec "$1"; }
size_bytes="$(to_bytes "$SIZE")"; region="$(to_bytes "$REGION")"
nreg=$((size_bytes / region))
random_bytes=$(((nreg + 1) / 2 * region)); zero_bytes=$((size_bytes - random_bytes))

log "making the $SIZE template: random data in even $REGION regions, zeros ($ZEROS) in odd ones"
T="$BENCH_DIR/template.raw"
truncate -s "$size_bytes" "$T"
for ((i = 0; i < nreg; i++)); do
    if [ $((i % 2)) = 0 ]; then src=/dev/urandom; else [ "$ZEROS" = written ] || continue; src=/dev/zero; fi
    dd if="$src" of="$T" bs="$region" count=1 seek="$i" conv=notrunc iflag=fullblock status=none
done
sparse_opt=--sparse=always; [ "$ZEROS" = written ] && sparse_opt=--sparse=never
echo "template: for i in 0..$((nreg - 1)): dd if=(i even: /dev/urandom, i odd: $([ "$ZEROS" = written ] && echo /dev/zero || echo 'nothing, a hole')) of=template.raw bs=$REGION seek=i conv=notrunc" >> "$OUT_DIR/commands.txt"

make_keys

# Drop the file's pages from the page cache after writing it out.
uncache() { sync; dd if="$1" iflag=nocache count=0 status=none; }
now() { "$PY" -c 'import time; print(time.time())'; }

run_bf() {
    local r="$1" vol="$BENCH_DIR/v-r$1" t0 res
    "$BF" volume create --dir "$vol" --size "$size_bytes" --name "r$r" >/dev/null
    [ "$r" = 1 ] && record "$BF" volume create --dir "$vol" --size "$size_bytes" --name "r$r"
    cp "$sparse_opt" "$T" "$vol/image.raw"
    uncache "$vol/image.raw"
    start_target "target-r$r" "$QUIC_PORT" "$BENCH_DIR/replicas-r$r"
    local TSOCK="$BENCH_DIR/target-r$r.sock"
    t0="$(now)"
    start_agent "bf-r$r" "$NBD_PORT" "$vol" --key-dir "$BENCH_DIR/keys-agent" \
        --target "127.0.0.1:$QUIC_PORT" --target-fingerprint "$TARGET_FP" --compression off
    res="$(rq wait-sync "$BENCH_DIR/bf-r$r.sock" "$TSOCK" "$t0" 1200)" || die "round $r: blockferry not in sync: $res"
    echo "$res" > "$OUT_DIR/bf.r$r.json"
    local replica; replica="$(rq status "$TSOCK" | "$PY" -c 'import json,sys; print([v for v in json.load(sys.stdin)["volumes"] if v["volume"]==sys.argv[1]][0]["replica_path"])' "r$r")"
    local same=no; cmp -s "$vol/image.raw" "$replica" && same=yes
    echo "$r $same $(du -B1 "$replica" | cut -f1)" >> "$OUT_DIR/bf-check.txt"
    stop "bf-r$r"; stop "target-r$r"
    log "round $r blockferry: $(echo "$res" | "$PY" -c 'import json,sys; d=json.load(sys.stdin); print("in sync after %.2f s, wire %d B" % (d["agent_in_sync_s"], d["status"]["wire_bytes_sent"]))'), replica identical: $same"
    rm -rf "$vol" "$BENCH_DIR/replicas-r$r"
}

run_timed() {  # run_timed TAG ROUND CMD...
    local tag="$1" r="$2" t0 t1; shift 2
    t0="$(date +%s.%N)"
    "$@" > "$OUT_DIR/$tag.r$r.txt" 2>&1 || { cat "$OUT_DIR/$tag.r$r.txt" >&2; die "$tag failed"; }
    t1="$(date +%s.%N)"
    echo "$r $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')" >> "$OUT_DIR/$tag-time.txt"
}

run_nbdcopy() {
    local r="$1" src="$BENCH_DIR/nc-src.raw" dst="$BENCH_DIR/nc-dst.raw"
    cp "$sparse_opt" "$T" "$src"; rm -f "$dst"; truncate -s "$size_bytes" "$dst"
    uncache "$src"
    qemu-nbd -f raw --read-only --persistent --cache=none --aio=io_uring -x src -b 127.0.0.1 -p "$QNBD_PORT" "$src" \
        > "$OUT_DIR/qemu-nbd.r$r.log" 2>&1 &
    local qpid=$!; PIDS+=("$qpid")
    local t=0; while ! port_busy "$QNBD_PORT"; do t=$((t + 1)); [ "$t" -gt 100 ] && die "qemu-nbd not up"; sleep 0.1; done
    [ "$r" = 1 ] && record qemu-nbd -f raw --read-only --persistent --cache=none --aio=io_uring -x src -b 127.0.0.1 -p "$QNBD_PORT" SRC \
        && record nbdcopy "nbd://127.0.0.1:$QNBD_PORT/src" DST "(DST: an empty sparse file of the same size)"
    run_timed nbdcopy "$r" nbdcopy "nbd://127.0.0.1:$QNBD_PORT/src" "$dst"
    kill "$qpid"; wait "$qpid" 2>/dev/null || true
    local same=no; cmp -s "$src" "$dst" && same=yes
    echo "$r $same $(du -B1 "$dst" | cut -f1)" >> "$OUT_DIR/nbdcopy-check.txt"
    log "round $r nbdcopy: $(tail -1 "$OUT_DIR/nbdcopy-time.txt" | cut -d' ' -f2) s, identical: $same"
    rm -f "$src" "$dst"
}

run_rsync() {
    local r="$1" src="$BENCH_DIR/rs-src.raw" dst="$BENCH_DIR/rs-dst.raw"
    cp "$sparse_opt" "$T" "$src"; rm -f "$dst"
    uncache "$src"
    [ "$r" = 1 ] && record rsync --sparse --stats SRC DST "(local, DST absent)"
    run_timed rsync "$r" rsync --sparse --stats "$src" "$dst"
    local same=no; cmp -s "$src" "$dst" && same=yes
    echo "$r $same $(du -B1 "$dst" | cut -f1)" >> "$OUT_DIR/rsync-check.txt"
    log "round $r rsync: $(tail -1 "$OUT_DIR/rsync-time.txt" | cut -d' ' -f2) s, identical: $same"
    rm -f "$src" "$dst"
}

TOOLS=(bf nbdcopy rsync)
for ((r = 1; r <= ROUNDS; r++)); do
    for ((k = 0; k < 3; k++)); do
        tool="${TOOLS[$(((k + r - 1) % 3))]}"
        log "round $r of $ROUNDS: $tool"
        "run_$tool" "$r"
    done
done

"$PY" - "$OUT_DIR" "$MD" "$ROUNDS" "$SIZE" "$REGION" "$ZEROS" "$random_bytes" "$zero_bytes" "$REV" "$(loadavg)" "$((SECONDS - T_START))" <<'EOF'
import json, os, sys, datetime, statistics as st
out, md, rounds, size, region, zeros, rnd, zero, rev, load, took = sys.argv[1:12]
rounds, rnd, zero = int(rounds), int(rnd), int(zero)
med = st.median
def kv(name):
    return {int(l.split()[0]): l.split()[1:] for l in open(os.path.join(out, name))}
times = {t: {r: float(v[0]) for r, v in kv(f"{t}-time.txt").items()} for t in ("nbdcopy", "rsync")}
checks = {t: kv(f"{t}-check.txt") for t in ("bf", "nbdcopy", "rsync")}
bf = {r: json.load(open(os.path.join(out, f"bf.r{r}.json"))) for r in range(1, rounds + 1)}
times["bf"] = {r: bf[r]["agent_in_sync_s"] for r in bf}
rows = [["tool", "time s (median)", "per round", "MiB/s of image", "identical", "dest allocated MiB", "vs blockferry"]]
label = {"bf": "blockferry agent -> target (QUIC, loopback)", "nbdcopy": "nbdcopy (qemu-nbd -> file)", "rsync": "rsync --sparse (local)"}
total = rnd + zero
for t in ("bf", "nbdcopy", "rsync"):
    xs = [times[t][r] for r in range(1, rounds + 1)]
    m = med(xs)
    rows.append([label[t], f"{m:.2f}", " ".join(f"{x:.2f}" for x in xs), f"{total / m / 2**20:,.0f}",
                 "/".join(checks[t][r][0] for r in range(1, rounds + 1)),
                 f"{med(int(checks[t][r][1]) for r in range(1, rounds + 1)) / 2**20:,.0f}",
                 "" if t == "bf" else f"{m / med(times['bf'].values()):.2f}x the time"])
wrows = [["round", "wire bytes", "data bytes", "random bytes", "wire - random", "as % of the zero bytes"]]
pcts = []
for r in range(1, rounds + 1):
    s = bf[r]["status"]
    w, d = s["wire_bytes_sent"], s["data_bytes_sent"]
    pcts.append(100 * (w - rnd) / zero)
    wrows.append([str(r), f"{w:,}", f"{d:,}", f"{rnd:,}", f"{w - rnd:,}", f"{100 * (w - rnd) / zero:.3f}%"])

def text_table(rows):
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows[:1]] +
                     ["  ".join("-" * x for x in w)] +
                     ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows[1:]])

def md_table(rows):
    return "\n".join(["| " + " | ".join(rows[0]) + " |", "|---|" + "|".join("---:" for _ in rows[0][1:]) + "|"] +
                     ["| " + " | ".join(r) + " |" for r in rows[1:]])

when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
head = (f"{when}, blockferry {rev}, {os.cpu_count()} CPUs, {size} image: random data and zeros ({zeros}) in alternating "
        f"{region} regions ({rnd:,} random bytes, {zero:,} zero bytes), source read from disk (page cache dropped), "
        f"blockferry --compression off, {rounds} round(s) rotated, took {took} s, load average at end {load}")
verdict = (f"zero half on the wire (upper bound: wire bytes beyond the random bytes, framing included): "
           f"{med(pcts):.3f}% of the zero bytes (target < 1%)")
print(); print(head); print(); print(text_table(rows)); print(); print(text_table(wrows)); print(); print(verdict)
with open(md, "w") as f:
    f.write(f"{head}\n\n{md_table(rows)}\n\nblockferry's bytes:\n\n{md_table(wrows)}\n\n{verdict}\n")
EOF
echo
echo "commands:"
sed 's/^/  /' "$OUT_DIR/commands.txt"
echo "markdown: $MD; raw: $OUT_DIR"
