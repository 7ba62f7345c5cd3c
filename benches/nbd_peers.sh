#!/usr/bin/env bash
# Side-by-side NBD server benchmark: blockferry against qemu-nbd and nbdkit, on one machine, in one
# run, with identical data and identical fio jobs (fio's nbd engine, one connection per job).
#
#   bash benches/nbd_peers.sh [--quick] [--rounds N] [--servers bf-none,bf-wb,qemu,nbdkit] [--no-build] [--keep]
#
#   --quick      3 s per run (1 s ramp) instead of 10 s (2 s ramp)
#   --rounds N   run every workload on every server N times (interleaved) and report the median
#                run of each: the disk and the machine are noisy, one run is not a figure
#   --servers    a subset, comma separated (default: all four)
#   --no-build   use build/release/blockferry as it is
#   --keep       keep the images in the work directory afterwards
#
# Environment: BENCH_DIR (images; default /var/tmp/blockferry-bench, must not be tmpfs),
# PORT_BASE (default 10890; four consecutive TCP ports on 127.0.0.1), RUNTIME / RAMP (seconds,
# override --quick), SIZE (image size, default 1G).
#
# Servers (compare like with like):
#   bf-none  blockferry agent --cache none --engine uring      vs  qemu   qemu-nbd --cache=none --aio=io_uring
#   bf-wb    blockferry agent --cache writeback --engine uring vs  nbdkit nbdkit file (page cache)
#
# Output: a table on stdout; the same as markdown in build/bench-nbd-peers.md; raw fio JSON, server
# CPU and per-thread CPU in build/bench-nbd-peers/.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
QUICK=0
BUILD=1
KEEP=0
ROUNDS=1
SERVERS="bf-none,bf-wb,qemu,nbdkit"
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --no-build) BUILD=0 ;;
        --keep) KEEP=1 ;;
        --servers) SERVERS="$2"; shift ;;
        --rounds) ROUNDS="$2"; shift ;;
        --rounds=*) ROUNDS="${1#--rounds=}" ;;
        --servers=*) SERVERS="${1#--servers=}" ;;
        -h|--help) sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "nbd_peers.sh: unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ "$QUICK" = 1 ]; then RUNTIME="${RUNTIME:-3}"; RAMP="${RAMP:-1}"; else RUNTIME="${RUNTIME:-10}"; RAMP="${RAMP:-2}"; fi
SIZE="${SIZE:-1G}"
PORT_BASE="${PORT_BASE:-10890}"
BENCH_DIR="${BENCH_DIR:-/var/tmp/blockferry-bench}"
OUT_DIR="$REPO/build/bench-nbd-peers"
MD="$REPO/build/bench-nbd-peers.md"
BIN="$REPO/build/release/blockferry"
IFS=',' read -r -a SRV_LIST <<< "$SERVERS"

die() { echo "nbd_peers.sh: $*" >&2; exit 1; }
log() { echo "[$(date +%T)] $*" >&2; }

# ---- tools ---------------------------------------------------------------------------------------
need() { command -v "$1" >/dev/null 2>&1 || die "$1 not found: install it (apt-get install $2)"; }
need fio fio
for s in "${SRV_LIST[@]}"; do
    case "$s" in
        bf-none|bf-wb) need cargo "rustup / cargo" ;;
        qemu) need qemu-nbd qemu-utils ;;
        nbdkit) need nbdkit nbdkit
                [ -n "$(nbdkit file --version 2>/dev/null)" ] || die "nbdkit file plugin missing (apt-get install nbdkit)" ;;
        *) die "unknown server '$s' (bf-none, bf-wb, qemu, nbdkit)" ;;
    esac
done
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine (need fio >= 3.18 built with libnbd)"
if [ -x /usr/bin/python3 ]; then PY=/usr/bin/python3; else need python3 python3; PY=python3; fi

# ---- build ---------------------------------------------------------------------------------------
uses_bf=0
for s in "${SRV_LIST[@]}"; do case "$s" in bf-*) uses_bf=1 ;; esac; done
if [ "$uses_bf" = 1 ]; then
    if [ "$BUILD" = 1 ]; then
        log "building blockferry (release)"
        (cd "$REPO" && cargo build --release -p blockferry-tools) || die "cargo build failed"
    fi
    [ -x "$BIN" ] || die "$BIN missing (build it, or drop --no-build)"
    "$BIN" agent --help >/dev/null 2>&1 || die "$BIN has no 'agent' subcommand yet"
fi

# ---- images on a real disk -----------------------------------------------------------------------
mkdir -p "$BENCH_DIR" "$OUT_DIR"
BENCH_DIR="$(cd "$BENCH_DIR" && pwd)"
fstype="$(stat -f -c %T "$BENCH_DIR")"
case "$fstype" in tmpfs|ramfs) die "$BENCH_DIR is on $fstype: set BENCH_DIR to a directory on a real disk" ;; esac
rm -f "$OUT_DIR"/*.json "$OUT_DIR"/*.cpu "$OUT_DIR"/*.threads "$OUT_DIR"/*.log "$OUT_DIR"/rss.txt

PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
    if [ "$KEEP" = 0 ]; then rm -rf "$BENCH_DIR"/base.raw "$BENCH_DIR"/srv-*; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "making a $SIZE image of random data in $BENCH_DIR ($fstype)"
rm -rf "$BENCH_DIR"/base.raw "$BENCH_DIR"/srv-*
head -c "$SIZE" /dev/urandom > "$BENCH_DIR/base.raw"
size_bytes="$(stat -c %s "$BENCH_DIR/base.raw")"

declare -A IMAGE PORT URI PID_OF LABEL
LABEL[bf-none]="blockferry none/uring"
LABEL[bf-wb]="blockferry writeback/uring"
LABEL[qemu]="qemu-nbd none/io_uring"
LABEL[nbdkit]="nbdkit file (page cache)"
i=0
for s in "${SRV_LIST[@]}"; do
    PORT[$s]=$((PORT_BASE + i)); i=$((i + 1))
    case "$s" in
        bf-*)
            name="${s//-/}"
            "$BIN" volume create --dir "$BENCH_DIR/srv-$s" --size "$size_bytes" --name "$name" >/dev/null
            IMAGE[$s]="$BENCH_DIR/srv-$s/image.raw" ;;
        *)
            mkdir -p "$BENCH_DIR/srv-$s"; name="$s"
            IMAGE[$s]="$BENCH_DIR/srv-$s/image.raw" ;;
    esac
    cp "$BENCH_DIR/base.raw" "${IMAGE[$s]}"
    URI[$s]="nbd://127.0.0.1:${PORT[$s]}/$name"
done
log "syncing the copies to disk"
sync

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_server() {
    local s="$1" port="${PORT[$1]}" logf="$OUT_DIR/$1.log" pid
    port_busy "$port" && die "port $port is already in use (set PORT_BASE)"
    case "$s" in
        bf-none) "$BIN" agent --volume "$BENCH_DIR/srv-$s" --listen "127.0.0.1:$port" --cache none --engine uring --admin "$BENCH_DIR/$s.sock" >"$logf" 2>&1 & ;;
        bf-wb)   "$BIN" agent --volume "$BENCH_DIR/srv-$s" --listen "127.0.0.1:$port" --cache writeback --engine uring --admin "$BENCH_DIR/$s.sock" >"$logf" 2>&1 & ;;
        qemu)    qemu-nbd -f raw --cache=none --aio=io_uring --shared=8 --persistent -x qemu \
                     -b 127.0.0.1 -p "$port" "${IMAGE[$s]}" >"$logf" 2>&1 & ;;
        nbdkit)  nbdkit -f -i 127.0.0.1 -p "$port" file "${IMAGE[$s]}" >"$logf" 2>&1 & ;;
    esac
    pid=$!
    PIDS+=("$pid"); PID_OF[$s]=$pid
    local t=0
    while :; do
        kill -0 "$pid" 2>/dev/null || { cat "$logf" >&2; die "$s exited at start (log above)"; }
        case "$s" in
            bf-*) grep -q "listening on" "$logf" && break ;;
            *) port_busy "$port" && break ;;
        esac
        t=$((t + 1)); [ "$t" -gt 300 ] && die "$s not ready after 30 s (log: $logf)"
        sleep 0.1
    done
    sleep 0.5
    local rss; rss="$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")"
    echo "$s idle_rss_kib $rss" >> "$OUT_DIR/rss.txt"
    log "started $s (pid $pid) at ${URI[$s]}, idle RSS ${rss} KiB"
}

for s in "${SRV_LIST[@]}"; do start_server "$s"; done

# CPU ticks (utime+stime) of the whole process, and per thread.
proc_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
thread_ticks() {
    local t
    for t in /proc/"$1"/task/*; do
        [ -r "$t/stat" ] || continue
        awk -v tid="${t##*/}" '{ c = $0; sub(/^[^(]*\(/, "", c); sub(/\).*$/, "", c); gsub(/ /, "_", c);
            r = $0; sub(/^.*\) /, "", r); split(r, f, " "); print tid, c, f[12] + f[13] }' "$t/stat"
    done
}

# ---- workloads, servers interleaved (rotated start) ----------------------------------------------
WORKLOADS=(randwrite-4k randread-4k write-1m read-1m)
declare -A RW BS QD
RW[randwrite-4k]=randwrite; BS[randwrite-4k]=4k; QD[randwrite-4k]=32
RW[randread-4k]=randread;   BS[randread-4k]=4k; QD[randread-4k]=32
RW[write-1m]=write;         BS[write-1m]=1m;    QD[write-1m]=8
RW[read-1m]=read;           BS[read-1m]=1m;     QD[read-1m]=8

n=${#SRV_LIST[@]}
TWIN="$(awk -v r="$RUNTIME" 'BEGIN { printf "%.1f", (r > 1 ? r - 0.6 : r / 2) }')"
w=0
for ((round = 1; round <= ROUNDS; round++)); do
for wl in "${WORKLOADS[@]}"; do
    for ((k = 0; k < n; k++)); do
        s="${SRV_LIST[$(((k + w) % n))]}"
        pid="${PID_OF[$s]}"
        sync  # no dirty pages of the previous run flushing during this one
        kill -0 "$pid" 2>/dev/null || die "$s (pid $pid) died; log: $OUT_DIR/$s.log"
        log "$wl on $s (round $round of $ROUNDS)"
        tag="$wl.$s.r$round"
        c0="$(proc_ticks "$pid")"
        # per-thread sample inside the measured window (worker threads may exit at disconnect)
        ( sleep "$RAMP"; sleep 0.2; thread_ticks "$pid" > "$OUT_DIR/$tag.threads0"
          sleep "$TWIN"; thread_ticks "$pid" > "$OUT_DIR/$tag.threads1" ) &
        sampler=$!
        fio --name="$wl" --ioengine=nbd --uri="${URI[$s]}" --rw="${RW[$wl]}" --bs="${BS[$wl]}" \
            --iodepth="${QD[$wl]}" --numjobs=1 --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
            --randrepeat=0 --output-format=json --output="$OUT_DIR/$tag.json" >/dev/null \
            || die "fio failed for $wl on $s (see $OUT_DIR/$tag.json, $OUT_DIR/$s.log)"
        c1="$(proc_ticks "$pid")"
        wait "$sampler" || true
        echo "$((c1 - c0)) $(getconf CLK_TCK) $((RUNTIME + RAMP)) $TWIN" > "$OUT_DIR/$tag.cpu"
    done
    w=$((w + 1))
done
done

for s in "${SRV_LIST[@]}"; do
    hwm="$(awk '/^VmHWM:/ {print $2}' "/proc/${PID_OF[$s]}/status")"
    echo "$s peak_rss_kib $hwm" >> "$OUT_DIR/rss.txt"
done

# ---- report ---------------------------------------------------------------------------------------
LOAD="$(cut -d' ' -f1-3 /proc/loadavg)"
REV="$(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown)"
"$PY" - "$OUT_DIR" "$MD" "$SERVERS" "$RUNTIME" "$RAMP" "$LOAD" "$SIZE" "$REV" "$ROUNDS" <<'EOF'
import json, os, sys, datetime, platform
out, md_path, servers, runtime, ramp, load, size, rev, rounds = sys.argv[1:10]
rounds = int(rounds)
servers = servers.split(",")
label = {"bf-none": "blockferry none/uring", "bf-wb": "blockferry writeback/uring",
         "qemu": "qemu-nbd none/io_uring", "nbdkit": "nbdkit file (page cache)"}
wls = [("randwrite-4k", "write", "4k randwrite qd32"), ("randread-4k", "read", "4k randread qd32"),
       ("write-1m", "write", "1M seq write qd8"), ("read-1m", "read", "1M seq read qd8")]
# With several rounds, each cell shows the run with the median IOPS of that server and workload
# (ratios are ratios of medians); `tag` remembers which round that was, for the thread profile.
res = {}
spread = {}
for wl, d, _ in wls:
    for s in servers:
        runs = []
        for rd in range(1, rounds + 1):
            tag = f"{wl}.{s}.r{rd}"
            j = json.load(open(os.path.join(out, f"{tag}.json")))["jobs"][0]
            if j.get("error"):
                raise SystemExit(f"fio error {j['error']} in {wl} on {s}")
            r = j[d]
            ticks, hz, secs = (int(x) for x in open(os.path.join(out, f"{tag}.cpu")).read().split()[:3])
            runs.append(dict(iops=r["iops"], mib=r["bw_bytes"] / 2**20, lat=r["lat_ns"]["mean"] / 1000,
                             p99=r["clat_ns"]["percentile"].get("99.000000", 0) / 1000,
                             cpu=100.0 * ticks / hz / secs, tag=tag))
        runs.sort(key=lambda x: x["iops"])
        res[wl, s] = runs[len(runs) // 2]
        spread[wl, s] = (runs[0]["iops"], runs[-1]["iops"])
rss = {}
for line in open(os.path.join(out, "rss.txt")):
    s, k, v = line.split()
    rss[s, k] = int(v) / 1024

def fnum(x, nd=0):
    return f"{x:,.{nd}f}"

def ratio(wl, a, b):
    if (wl, a) in res and (wl, b) in res and res[wl, b]["iops"] > 0:
        return res[wl, a]["iops"] / res[wl, b]["iops"]
    return None

pairs = [("bf-none", "qemu"), ("bf-wb", "nbdkit")]
rows = [["workload", "server", "IOPS" + (f" (median of {rounds})" if rounds > 1 else ""), "min-max IOPS", "MiB/s", "mean lat µs", "p99 clat µs", "server CPU %", "ratio vs peer"]]
for wl, _, title in wls:
    for s in servers:
        r = res[wl, s]
        rt = ""
        for a, b in pairs:
            if s == a and ratio(wl, a, b) is not None:
                rt = f"{ratio(wl, a, b):.2f}x vs {b}"
        lo, hi = spread[wl, s]
        rows.append([title, label[s], fnum(r["iops"]), f"{fnum(lo)}-{fnum(hi)}", fnum(r["mib"], 1), fnum(r["lat"], 1),
                     fnum(r["p99"], 0), fnum(r["cpu"], 0), rt])

rrows = [["workload", "bf-none / qemu-nbd", "bf-wb / nbdkit", "best blockferry, either cache mode / qemu-nbd"]]
for wl, _, title in wls:
    c = []
    for a, b in pairs:
        x = ratio(wl, a, b); c.append(f"{x:.2f}x" if x else "-")
    bfs = [s for s in ("bf-none", "bf-wb") if (wl, s) in res]
    if bfs and (wl, "qemu") in res:
        best = max(bfs, key=lambda s: res[wl, s]["iops"])
        x = ratio(wl, best, "qemu")
        note = " (target >= 1.3x)" if wl == "randwrite-4k" else ""
        c.append(f"{x:.2f}x ({best}){note}")
    else:
        c.append("-")
    rrows.append([title] + c)

mrows = [["server", "idle RSS MiB (after start)", "peak RSS MiB (VmHWM after runs)"]]
for s in servers:
    idle = rss.get((s, "idle_rss_kib")); peak = rss.get((s, "peak_rss_kib"))
    note = " (target < 30)" if s.startswith("bf-") else ""
    mrows.append([label[s], f"{idle:.1f}{note}" if idle is not None else "-",
                  f"{peak:.1f}" if peak is not None else "-"])

def text_table(rows):
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        lines.append("  ".join(c.rjust(w[i]) if i >= 2 and n else c.ljust(w[i]) for i, c in enumerate(r)))
        if n == 0:
            lines.append("  ".join("-" * x for x in w))
    return "\n".join(lines)

def md_table(rows):
    out = ["| " + " | ".join(rows[0]) + " |",
           "|" + "|".join("---" if i < 2 else "---:" for i in range(len(rows[0]))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)

when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
head = (f"{when}, blockferry {rev}, {os.cpu_count()} CPUs, {size} image of random data, "
        f"fio nbd engine, 1 connection, {runtime} s + {ramp} s ramp per run, {rounds} round(s) "
        f"interleaved, load average at end {load}")
print()
print(head)
print()
print(text_table(rows)); print()
print(text_table(rrows)); print()
print(text_table(mrows))
with open(md_path, "w") as f:
    f.write(f"{head}\n\n{md_table(rows)}\n\nIOPS ratios (blockferry / peer):\n\n{md_table(rrows)}\n\n"
            f"Memory:\n\n{md_table(mrows)}\n")
# Per-thread CPU of each server during each run (for diagnosis), into threads.txt.
with open(os.path.join(out, "threads.txt"), "w") as f:
    for wl, _, title in wls:
        for s in servers:
            def load_t(suffix):
                d = {}
                for line in open(os.path.join(out, f"{res[wl, s]['tag']}.{suffix}")):
                    tid, comm, t = line.split()
                    d[tid] = (comm, int(t))
                return d
            t0, t1 = load_t("threads0"), load_t("threads1")
            cf = open(os.path.join(out, f"{res[wl, s]['tag']}.cpu")).read().split()
            ticks, hz, secs, win = int(cf[0]), int(cf[1]), int(cf[2]), float(cf[3])
            by = {}
            for tid, (comm, t) in t1.items():
                dt = t - t0.get(tid, (comm, 0))[1]
                c = by.setdefault(comm, [0, 0]); c[0] += dt; c[1] += 1
            parts = ", ".join(f"{comm} x{n}: {100.0 * dt / hz / win:.0f}%"
                              for comm, (dt, n) in sorted(by.items(), key=lambda kv: -kv[1][0]) if dt > 0)
            f.write(f"{title:18} {s:8} total {100.0 * ticks / hz / secs:4.0f}%  {parts}\n")
print(open(os.path.join(out, "threads.txt")).read())
print(f"\nmarkdown: {md_path}\nraw fio JSON, CPU, per-thread CPU: {out}")
EOF
