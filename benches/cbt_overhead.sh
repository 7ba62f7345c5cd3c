#!/usr/bin/env bash
# Changed-block tracking overhead (issue 3): the same agent binary with tracking off and on, side by
# side in one run, plus the activity log's transaction rate and the bitmaps' memory per TiB.
#
#   bash benches/cbt_overhead.sh [--quick] [--rounds N] [--cache writeback,none] [--perf] [--no-memory] [--no-build] [--keep]
#
#   --quick      3 s per run (1 s ramp) instead of 10 s (2 s ramp), 10,000 writes per AL pass
#   --rounds N   every overhead run N times, off and on interleaved (order alternating), and the
#                activity-log passes N times on fresh volumes; medians are reported
#   --cache      cache modes to compare off/on in (default: writeback,none)
#   --perf       after the rounds, one more 4k randwrite run per cache mode on the "on" agent under
#                `perf record`, not counted above: the share of the agent's CPU samples spent in
#                the tracking code itself (a figure that the machine's noise does not move much)
#   --no-memory  skip the 1 TiB memory measurement
#   --no-build   use build/release/blockferry as it is
#   --keep       keep the volumes in the work directory afterwards
#
# Environment: BENCH_DIR (volumes; default /var/tmp/blockferry-cbt-bench, must not be tmpfs and
# must take a sparse 1 TiB file), PORT_BASE (default 10870; six TCP ports from there on
# 127.0.0.1), RUNTIME / RAMP (seconds, override --quick), AL_IOS (writes per activity-log pass,
# default 20000), MEM_SIZE (volume of the memory measurement, default 1T).
#
# What runs (fio's nbd engine, one connection, all on 127.0.0.1):
#   1. Overhead: per cache mode, two agents serve identical volumes, one with change-tracking =
#      false ("off"), one with change-tracking = true and one named bitmap ("on"). After a
#      warm-up (a 1M write over the whole 1 GiB volume, so every extent is in the activity log
#      and every bitmap page allocated) and fio's ramp, both run 4k randwrite qd32 and 1M write
#      qd8 on a 1 GiB volume (steady state: 256 extents, the hot set holds 1024). With writeback
#      also 4k randwrite qd32 over a 16 GiB sparse volume (beyond the 4 GiB hot set: 3 of 4
#      writes miss the log; shown, not part of the steady-state goal). Before every run: sync, and
#      the image's pages dropped from the page cache (see fresh_cache below).
#   2. Activity-log transactions (and extents added, evictions, bitmap pages written) per 10,000
#      4k random writes (qd32), from the agent's /v1/volumes/VOL/tracking counters: a 1 GiB
#      working set on a fresh 1 GiB volume (first pass from an empty log, then a second pass) and
#      a 16 GiB working set on a fresh 16 GiB sparse volume (first pass, then a steady pass).
#   3. Memory: agent RSS on a sparse MEM_SIZE volume, tracking off vs on with one bitmap, idle
#      and after one 4 KiB write in each 127 MiB bitmap page (every page allocated), against
#      what the design says.
#
# Output: tables on stdout; the same as markdown in build/bench-cbt-overhead.md; raw fio JSON,
# tracking counters, CPU ticks and RSS in build/bench-cbt-overhead/.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
T_START=$SECONDS
QUICK=0
BUILD=1
KEEP=0
MEMORY=1
PERF=0
ROUNDS=1
CACHES="writeback,none"
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --no-build) BUILD=0 ;;
        --keep) KEEP=1 ;;
        --no-memory) MEMORY=0 ;;
        --perf) PERF=1 ;;
        --cache) CACHES="$2"; shift ;;
        --cache=*) CACHES="${1#--cache=}" ;;
        --rounds) ROUNDS="$2"; shift ;;
        --rounds=*) ROUNDS="${1#--rounds=}" ;;
        -h|--help) sed -n '2,41p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "cbt_overhead.sh: unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ "$QUICK" = 1 ]; then
    RUNTIME="${RUNTIME:-3}"; RAMP="${RAMP:-1}"; AL_IOS="${AL_IOS:-10000}"
else
    RUNTIME="${RUNTIME:-10}"; RAMP="${RAMP:-2}"; AL_IOS="${AL_IOS:-20000}"
fi
MEM_SIZE="${MEM_SIZE:-1T}"
PORT_BASE="${PORT_BASE:-10870}"
BENCH_DIR="${BENCH_DIR:-/var/tmp/blockferry-cbt-bench}"
OUT_DIR="$REPO/build/bench-cbt-overhead"
MD="$REPO/build/bench-cbt-overhead.md"
BIN="$REPO/build/release/blockferry"
IFS=',' read -r -a CACHE_LIST <<< "$CACHES"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || { echo "cbt_overhead.sh: --rounds needs a positive number, not '$ROUNDS'" >&2; exit 2; }

die() { echo "cbt_overhead.sh: $*" >&2; exit 1; }
log() { echo "[$(date +%T)] $*" >&2; }

# ---- tools ---------------------------------------------------------------------------------------
need() { command -v "$1" >/dev/null 2>&1 || die "$1 not found: install it (apt-get install $2)"; }
need fio fio
need curl curl
need jq jq
need dd coreutils
[ "$PERF" = 1 ] && need perf "linux-perf"
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine (need fio >= 3.18 built with libnbd)"
if [ -x /usr/bin/python3 ]; then PY=/usr/bin/python3; else need python3 python3; PY=python3; fi
for c in "${CACHE_LIST[@]}"; do
    case "$c" in writeback|none) ;; *) die "unknown cache mode '$c' (writeback, none)" ;; esac
done

# ---- build ---------------------------------------------------------------------------------------
if [ "$BUILD" = 1 ]; then
    need cargo "rustup / cargo"
    log "building blockferry (release)"
    (cd "$REPO" && cargo build --release -p blockferry-tools) || die "cargo build failed"
fi
[ -x "$BIN" ] || die "$BIN missing (build it, or drop --no-build)"
"$BIN" cbt --help >/dev/null 2>&1 || die "$BIN has no 'cbt' subcommand (needs change tracking, issue 3)"
REV="$(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown)"

# ---- work directory on a real disk ---------------------------------------------------------------
mkdir -p "$BENCH_DIR" "$OUT_DIR"
BENCH_DIR="$(cd "$BENCH_DIR" && pwd)"
fstype="$(stat -f -c %T "$BENCH_DIR")"
case "$fstype" in tmpfs|ramfs) die "$BENCH_DIR is on $fstype: set BENCH_DIR to a directory on a real disk" ;; esac
rm -rf "${OUT_DIR:?}"/*
if [ "$MEMORY" = 1 ]; then  # fail now rather than after the overhead runs
    truncate -s "$MEM_SIZE" "$BENCH_DIR/.sparse-probe" 2>/dev/null \
        || { rm -f "$BENCH_DIR/.sparse-probe"; die "$BENCH_DIR ($fstype) cannot hold a sparse $MEM_SIZE file: set BENCH_DIR elsewhere, MEM_SIZE smaller, or --no-memory"; }
    rm -f "$BENCH_DIR/.sparse-probe"
fi

PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
    if [ "$KEEP" = 0 ]; then rm -rf "$BENCH_DIR"/v-* "$BENCH_DIR"/*.toml "$BENCH_DIR"/*.sock "$BENCH_DIR"/blockferry; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
rm -rf "$BENCH_DIR"/v-* "$BENCH_DIR"/*.toml "$BENCH_DIR"/*.sock
# A private copy: others may rebuild build/release/blockferry while this runs.
cp "$BIN" "$BENCH_DIR/blockferry"
BIN="$BENCH_DIR/blockferry"

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# CPU ticks (utime + stime, all threads) of a process.
proc_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
rss_kib() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }

declare -A PID_OF SOCK_OF PORT_OF
# make_volume DIR SIZE NAME
make_volume() { "$BIN" volume create --dir "$1" --size "$2" --name "$3" >/dev/null || die "cannot create volume $3 in $1"; }

# start_agent KEY PORT TRACKING(true|false) CACHE VOLDIR...: an agent with a config file.
start_agent() {
    local key="$1" port="$2" tracking="$3" cache="$4"; shift 4
    local cfg="$BENCH_DIR/$key.toml" sock="$BENCH_DIR/$key.sock" logf="$OUT_DIR/$key.log" d pid t=0
    port_busy "$port" && die "port $port is already in use (set PORT_BASE)"
    echo "listen = \"127.0.0.1:$port\"" > "$cfg"
    for d in "$@"; do
        printf '\n[[volume]]\ndir = "%s"\ncache = "%s"\nengine = "uring"\nchange-tracking = %s\n' \
            "$d" "$cache" "$tracking" >> "$cfg"
    done
    rm -f "$sock"
    "$BIN" agent --config "$cfg" --admin "$sock" > "$logf" 2>&1 &
    pid=$!
    PIDS+=("$pid"); PID_OF[$key]=$pid; SOCK_OF[$key]=$sock; PORT_OF[$key]=$port
    while ! grep -q "listening on" "$logf"; do
        kill -0 "$pid" 2>/dev/null || { cat "$logf" >&2; die "agent $key exited at start (log above)"; }
        t=$((t + 1)); [ "$t" -gt 300 ] && die "agent $key not ready after 30 s (log: $logf)"
        sleep 0.1
    done
    sleep 0.5
}

# stop_agent KEY: SIGTERM (a clean stop) and wait.
stop_agent() {
    local key="$1" pid="${PID_OF[$1]}" p keep=()
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for p in "${PIDS[@]}"; do [ "$p" != "$pid" ] && keep+=("$p"); done
    PIDS=("${keep[@]:-}")
}

# create_bitmap KEY VOL
create_bitmap() {
    "$BIN" cbt --admin "${SOCK_OF[$1]}" create "$2" b1 >/dev/null || die "cannot create bitmap b1 on $2 (agent $1, log $OUT_DIR/$1.log)"
}

# tracking KEY VOL OUTFILE: the tracker's counters as JSON.
tracking() {
    curl -sf --unix-socket "${SOCK_OF[$1]}" "http://x/v1/volumes/$2/tracking" > "$3" \
        || die "GET /v1/volumes/$2/tracking failed on agent $1 (log $OUT_DIR/$1.log)"
}

uri() { echo "nbd://127.0.0.1:${PORT_OF[$1]}/$2"; }

# fresh_cache VOLDIR: sync, then drop the image's pages from the page cache (POSIX_FADV_DONTNEED
# on the whole file), so every run starts from the same page-cache state. Without it a 4k
# random-write run that follows a 1M write run is about 3x slower with writeback, for both off
# and on: the 1M buffered writes leave large folios behind, and each 4 KiB write into one costs
# a walk of its buffer heads (43% of the agent's CPU in ext4_block_write_begin, kernel 6.18).
fresh_cache() {
    sync
    dd if="$1/image.raw" iflag=nocache count=0 status=none || die "cannot drop the page cache of $1/image.raw"
}

# ---- 1. overhead: tracking off vs on, interleaved -------------------------------------------------
declare -A SHORT=([writeback]=wb [none]=none)
i=0
for c in "${CACHE_LIST[@]}"; do
    for t in off on; do
        key="${SHORT[$c]}-$t"
        make_volume "$BENCH_DIR/v-$key-1g" 1G "$key-1g"
        vols=("$BENCH_DIR/v-$key-1g")
        if [ "$c" = writeback ]; then
            make_volume "$BENCH_DIR/v-$key-16g" 16G "$key-16g"
            vols+=("$BENCH_DIR/v-$key-16g")
        fi
        tr=false; [ "$t" = on ] && tr=true
        start_agent "$key" $((PORT_BASE + i)) "$tr" "$c" "${vols[@]}"
        i=$((i + 1))
        if [ "$t" = on ]; then
            create_bitmap "$key" "$key-1g"
            [ "$c" = writeback ] && create_bitmap "$key" "$key-16g"
        fi
        log "started agent $key (pid ${PID_OF[$key]}, tracking $t, cache $c); warming up"
        # Every extent of the 1 GiB volume into the log, every bitmap page allocated, every
        # block of the image allocated: one 1M sequential pass.
        fio --name=warm --ioengine=nbd --uri="$(uri "$key" "$key-1g")" --rw=write --bs=1m --iodepth=8 \
            --output-format=json --output="$OUT_DIR/warmup.$key-1g.json" >/dev/null \
            || die "warm-up fio failed on $key-1g"
        if [ "$c" = writeback ]; then
            # The 16 GiB volume: a full activity log (1024 of its 4096 extents).
            fio --name=warm --ioengine=nbd --uri="$(uri "$key" "$key-16g")" --rw=randwrite --bs=4k \
                --iodepth=32 --number_ios="$AL_IOS" --randrepeat=0 --output-format=json \
                --output="$OUT_DIR/warmup.$key-16g.json" >/dev/null || die "warm-up fio failed on $key-16g"
        fi
        echo "$key idle_rss_kib $(rss_kib "${PID_OF[$key]}" VmRSS)" >> "$OUT_DIR/rss.txt"
    done
done
sync

# name rw bs qd volume-suffix; the 16 GiB row is writeback only
WORKLOADS=(randwrite-4k write-1m randwrite-4k-16g)
declare -A RW BS QD VS
RW[randwrite-4k]=randwrite;     BS[randwrite-4k]=4k;     QD[randwrite-4k]=32;     VS[randwrite-4k]=1g
RW[write-1m]=write;             BS[write-1m]=1m;         QD[write-1m]=8;          VS[write-1m]=1g
RW[randwrite-4k-16g]=randwrite; BS[randwrite-4k-16g]=4k; QD[randwrite-4k-16g]=32; VS[randwrite-4k-16g]=16g

w=0
for ((round = 1; round <= ROUNDS; round++)); do
for wl in "${WORKLOADS[@]}"; do
    for c in "${CACHE_LIST[@]}"; do
        [ "${VS[$wl]}" = 16g ] && [ "$c" != writeback ] && continue
        if [ $((w % 2)) = 0 ]; then order=(off on); else order=(on off); fi
        w=$((w + 1))
        for t in "${order[@]}"; do
            key="${SHORT[$c]}-$t"; vol="$key-${VS[$wl]}"; pid="${PID_OF[$key]}"
            tag="$wl.$c.$t.r$round"
            fresh_cache "$BENCH_DIR/v-$vol"  # also: no dirty pages of the previous run flushing now
            kill -0 "$pid" 2>/dev/null || die "agent $key (pid $pid) died; log: $OUT_DIR/$key.log"
            log "$wl, cache $c, tracking $t (round $round of $ROUNDS)"
            [ "$t" = on ] && tracking "$key" "$vol" "$OUT_DIR/$tag.trk0"
            c0="$(proc_ticks "$pid")"
            fio --name="$wl" --ioengine=nbd --uri="$(uri "$key" "$vol")" --rw="${RW[$wl]}" --bs="${BS[$wl]}" \
                --iodepth="${QD[$wl]}" --numjobs=1 --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
                --randrepeat=0 --output-format=json --output="$OUT_DIR/$tag.json" >/dev/null \
                || die "fio failed for $wl on $key (see $OUT_DIR/$tag.json, $OUT_DIR/$key.log)"
            c1="$(proc_ticks "$pid")"
            [ "$t" = on ] && tracking "$key" "$vol" "$OUT_DIR/$tag.trk1"
            echo "$((c1 - c0)) $(getconf CLK_TCK) $((RUNTIME + RAMP))" > "$OUT_DIR/$tag.cpu"
        done
    done
done
done
if [ "$PERF" = 1 ]; then
    for c in "${CACHE_LIST[@]}"; do
        key="${SHORT[$c]}-on"; pid="${PID_OF[$key]}"
        fresh_cache "$BENCH_DIR/v-$key-1g"
        log "profile: randwrite-4k, cache $c, tracking on, under perf record (not counted above)"
        fio --name=perf --ioengine=nbd --uri="$(uri "$key" "$key-1g")" --rw=randwrite --bs=4k --iodepth=32 \
            --time_based --runtime=$((RUNTIME + RAMP)) --randrepeat=0 --output-format=json \
            --output="$OUT_DIR/perf.$c.json" >/dev/null &
        fpid=$!
        sleep "$RAMP"
        perf record -F 1999 -p "$pid" -o "$OUT_DIR/perf.$c.data" -- sleep $((RUNTIME > 2 ? RUNTIME - 1 : 1)) \
            >/dev/null 2>"$OUT_DIR/perf.$c.log" || die "perf record failed (see $OUT_DIR/perf.$c.log)"
        wait "$fpid" || die "fio failed during the profile run (cache $c)"
        # Self time per symbol; the tracking code is blockferry_agent::cbt::* and the NBD
        # connection's track() (begin_write is inlined into it).
        perf report -i "$OUT_DIR/perf.$c.data" --no-children --sort symbol --stdio 2>/dev/null \
            > "$OUT_DIR/perf.$c.txt" || die "perf report failed"
        awk -v c="$c" '/%/ && /blockferry_agent::cbt::|nbd::conn::track/ { sub(/%/, "", $1); s += $1; n++ }
            END { printf "%s %.2f %d\n", c, s, n }' "$OUT_DIR/perf.$c.txt" >> "$OUT_DIR/perf.txt"
    done
fi
for c in "${CACHE_LIST[@]}"; do
    for t in off on; do
        key="${SHORT[$c]}-$t"
        echo "$key peak_rss_kib $(rss_kib "${PID_OF[$key]}" VmHWM)" >> "$OUT_DIR/rss.txt"
        stop_agent "$key"
    done
done
rm -rf "$BENCH_DIR"/v-wb-* "$BENCH_DIR"/v-none-*

# ---- 2. activity-log transactions per 10,000 writes ----------------------------------------------
# al_pass ROUND VOL PASS
al_pass() {
    local tag="al.$2.$3.r$1"
    tracking al "$2" "$OUT_DIR/$tag.trk0"
    fio --name="$3" --ioengine=nbd --uri="$(uri al "$2")" --rw=randwrite --bs=4k --iodepth=32 \
        --number_ios="$AL_IOS" --randrepeat=0 --output-format=json --output="$OUT_DIR/$tag.json" >/dev/null \
        || die "fio failed for the activity-log pass $3 on $2 (see $OUT_DIR/$tag.json)"
    tracking al "$2" "$OUT_DIR/$tag.trk1"
}
for ((round = 1; round <= ROUNDS; round++)); do
    log "activity-log passes, $AL_IOS writes each (round $round of $ROUNDS)"
    make_volume "$BENCH_DIR/v-al-r$round-1g" 1G al1g
    make_volume "$BENCH_DIR/v-al-r$round-16g" 16G al16g
    start_agent al $((PORT_BASE + 4)) true writeback "$BENCH_DIR/v-al-r$round-1g" "$BENCH_DIR/v-al-r$round-16g"
    create_bitmap al al1g
    create_bitmap al al16g
    sync
    al_pass "$round" al1g first
    al_pass "$round" al1g second
    al_pass "$round" al16g first
    al_pass "$round" al16g steady
    stop_agent al
    grep -q "stopped cleanly" "$OUT_DIR/al.log" || log "warning: agent al did not report a clean stop (log $OUT_DIR/al.log)"
    cp "$OUT_DIR/al.log" "$OUT_DIR/al.r$round.log"
    rm -rf "$BENCH_DIR/v-al-r$round-1g" "$BENCH_DIR/v-al-r$round-16g"
done

# ---- 3. memory per TiB --------------------------------------------------------------------------
if [ "$MEMORY" = 1 ]; then
    log "memory: a sparse $MEM_SIZE volume, tracking off then on"
    make_volume "$BENCH_DIR/v-mem" "$MEM_SIZE" mem
    mem_bytes="$(stat -c %s "$BENCH_DIR/v-mem/image.raw")"
    # One 4 KiB write at the start of every bitmap page (32,512 blocks of 4 KiB = 127 MiB).
    page_bytes=$((32512 * 4096))
    n_pages=$(((mem_bytes / 4096 + 32511) / 32512))
    mem_fio() {
        fio --name=pages --ioengine=nbd --uri="$(uri "$1" mem)" --rw=write:$((page_bytes - 4096)) --bs=4k \
            --iodepth=32 --number_ios="$n_pages" --output-format=json --output="$OUT_DIR/mem.$1.json" >/dev/null \
            || die "fio failed writing one block per bitmap page on agent $1"
        sleep 0.5
    }
    : > "$OUT_DIR/mem.txt"
    start_agent mem-off $((PORT_BASE + 5)) false writeback "$BENCH_DIR/v-mem"
    echo "off idle $(rss_kib "${PID_OF[mem-off]}" VmRSS)" >> "$OUT_DIR/mem.txt"
    mem_fio mem-off
    echo "off written $(rss_kib "${PID_OF[mem-off]}" VmRSS)" >> "$OUT_DIR/mem.txt"
    stop_agent mem-off
    start_agent mem-on $((PORT_BASE + 5)) true writeback "$BENCH_DIR/v-mem"
    echo "on idle-nobitmap $(rss_kib "${PID_OF[mem-on]}" VmRSS)" >> "$OUT_DIR/mem.txt"
    create_bitmap mem-on mem
    sleep 0.5
    echo "on idle $(rss_kib "${PID_OF[mem-on]}" VmRSS)" >> "$OUT_DIR/mem.txt"
    echo "on create-peak $(rss_kib "${PID_OF[mem-on]}" VmHWM)" >> "$OUT_DIR/mem.txt"
    mem_fio mem-on
    echo "on written $(rss_kib "${PID_OF[mem-on]}" VmRSS)" >> "$OUT_DIR/mem.txt"
    curl -sf --unix-socket "${SOCK_OF[mem-on]}" "http://x/v1/volumes/mem/bitmaps" > "$OUT_DIR/mem.bitmaps.json" \
        || die "GET /v1/volumes/mem/bitmaps failed"
    tracking mem-on mem "$OUT_DIR/mem.trk"
    stop_agent mem-on
    dirty="$(jq '.[0].dirty_bytes' "$OUT_DIR/mem.bitmaps.json")"
    [ "$dirty" = $((n_pages * 4096)) ] \
        || log "warning: bitmap has $dirty dirty bytes, expected $((n_pages * 4096)) (one block in each of $n_pages pages)"
    echo "meta bytes $mem_bytes" >> "$OUT_DIR/mem.txt"
    echo "meta pages $n_pages" >> "$OUT_DIR/mem.txt"
    echo "meta dirty $dirty" >> "$OUT_DIR/mem.txt"
    rm -rf "$BENCH_DIR/v-mem"
fi

# ---- report ---------------------------------------------------------------------------------------
LOAD="$(cut -d' ' -f1-3 /proc/loadavg)"
ELAPSED=$((SECONDS - T_START))
"$PY" - "$OUT_DIR" "$MD" "$CACHES" "$RUNTIME" "$RAMP" "$LOAD" "$REV" "$ROUNDS" "$AL_IOS" "$MEMORY" "$ELAPSED" <<'EOF'
import json, os, sys, datetime, statistics
out, md_path, caches, runtime, ramp, load, rev, rounds, al_ios, memory, elapsed = sys.argv[1:12]
rounds, al_ios, elapsed = int(rounds), int(al_ios), int(elapsed)
caches = caches.split(",")

def jload(p):
    return json.load(open(os.path.join(out, p)))

def fnum(x, nd=0):
    return f"{x:,.{nd}f}"

def median(xs):
    return statistics.median(xs)

# ---- overhead ----
wls = [("randwrite-4k", "4k randwrite qd32, 1 GiB"), ("write-1m", "1M seq write qd8, 1 GiB"),
       ("randwrite-4k-16g", "4k randwrite qd32, 16 GiB (beyond the hot set)")]
runs = {}
for wl, _ in wls:
    for c in caches:
        if wl.endswith("16g") and c != "writeback":
            continue
        for t in ("off", "on"):
            for rd in range(1, rounds + 1):
                tag = f"{wl}.{c}.{t}.r{rd}"
                j = jload(f"{tag}.json")["jobs"][0]
                if j.get("error"):
                    raise SystemExit(f"fio error {j['error']} in {tag}")
                r = j["write"]
                ticks, hz, secs = (int(x) for x in open(os.path.join(out, f"{tag}.cpu")).read().split()[:3])
                pct = r["clat_ns"]["percentile"]
                run = dict(iops=r["iops"], mib=r["bw_bytes"] / 2**20, p50=pct.get("50.000000", 0) / 1000,
                           p99=pct.get("99.000000", 0) / 1000, cpu=100.0 * ticks / hz / secs,
                           cpu_per_io=1e6 * ticks / hz / max(1.0, r["iops"] * secs))
                if t == "on":
                    a, b = jload(f"{tag}.trk0"), jload(f"{tag}.trk1")
                    run["tx"] = b["al_transactions"] - a["al_transactions"]
                    run["writes"] = b["writes_tracked"] - a["writes_tracked"]
                runs.setdefault((wl, c, t), []).append(run)

def med(wl, c, t, k):
    return median([r[k] for r in runs[wl, c, t]])

rows = [["workload", "cache", "tracking", f"IOPS (median of {rounds})", "min-max IOPS", "MiB/s",
         "p50 clat µs", "p99 clat µs", "agent CPU %", "agent CPU µs/write", "AL tx in run",
         "on/off IOPS", "on/off per round", ">= 0.95x"]]
for wl, title in wls:
    for c in caches:
        if (wl, c, "off") not in runs:
            continue
        ratio = med(wl, c, "on", "iops") / med(wl, c, "off", "iops")
        paired = [on["iops"] / off["iops"] for on, off in zip(runs[wl, c, "on"], runs[wl, c, "off"])]
        for t in ("off", "on"):
            rs = runs[wl, c, t]
            lo, hi = min(r["iops"] for r in rs), max(r["iops"] for r in rs)
            tx = ""
            if t == "on":
                tx = "/".join(f"{r['tx']:,}" for r in rs)
            goal = ""
            if t == "on":
                goal = ("yes" if ratio >= 0.95 else "**no**") if not wl.endswith("16g") else "(not a goal row)"
            rows.append([title, c, t, fnum(med(wl, c, t, "iops")), f"{fnum(lo)}-{fnum(hi)}",
                         fnum(med(wl, c, t, "mib"), 1), fnum(med(wl, c, t, "p50")),
                         fnum(med(wl, c, t, "p99")), fnum(med(wl, c, t, "cpu")),
                         fnum(med(wl, c, t, "cpu_per_io"), 1), tx,
                         f"{ratio:.2f}x" if t == "on" else "",
                         " ".join(f"{x:.2f}" for x in paired) if t == "on" else "", goal])

# ---- activity log ----
passes = [("al1g", "first", "1 GiB on a 1 GiB volume", "first pass (empty log: includes the warm-up)"),
          ("al1g", "second", "1 GiB on a 1 GiB volume", "second pass (steady)"),
          ("al16g", "first", "16 GiB on a 16 GiB volume", "first pass (empty log: includes the warm-up)"),
          ("al16g", "steady", "16 GiB on a 16 GiB volume", "second pass (steady)")]
keys = ["al_transactions", "al_extents_added", "al_evictions", "bitmap_pages_written"]
arows = [["working set", "pass", f"writes (median of {rounds})", "AL transactions / 10k writes", "min-max",
          "extents added / 10k", "evictions / 10k", "bitmap pages written / 10k", "writes per transaction",
          "IOPS"]]
for vol, p, ws, title in passes:
    per = {k: [] for k in keys}
    writes, iops = [], []
    for rd in range(1, rounds + 1):
        tag = f"al.{vol}.{p}.r{rd}"
        a, b = jload(f"{tag}.trk0"), jload(f"{tag}.trk1")
        n = b["writes_tracked"] - a["writes_tracked"]
        writes.append(n)
        for k in keys:
            per[k].append((b[k] - a[k]) * 10000 / n)
        iops.append(jload(f"{tag}.json")["jobs"][0]["write"]["iops"])
    tx = median(per["al_transactions"])
    arows.append([ws, title, fnum(median(writes)), fnum(tx, 1),
                  f"{fnum(min(per['al_transactions']), 1)}-{fnum(max(per['al_transactions']), 1)}",
                  fnum(median(per["al_extents_added"]), 1), fnum(median(per["al_evictions"]), 1),
                  fnum(median(per["bitmap_pages_written"]), 1),
                  fnum(10000 / tx, 1) if tx > 0 else "-", fnum(median(iops))])

# ---- memory ----
mrows = None
if memory == "1":
    m = {}
    for line in open(os.path.join(out, "mem.txt")):
        a, b, v = line.split()
        m[a, b] = int(v)
    size, pages = m["meta", "bytes"], m["meta", "pages"]
    tib = size / 2**40
    MiB = 2**20
    # The design (agent/src/cbt/bitmap.rs, Tracker::memory_bytes): per bitmap page (32,512 bits =
    # 127 MiB of a 4 KiB-block volume) a 24-byte OnceLock<Box<[AtomicU64]>> slot, a dirty flag and a
    # current-copy byte; a 4,064-byte leaf once a bit is set in it; per 4 MiB activity-log extent a
    # 4-byte state word (whenever change tracking is on, bitmaps or not).
    slots = pages * 26
    leaves = pages * 4064
    states = (size // (4 << 20)) * 4
    def per_tib(b):
        return b / MiB / tib
    on_idle = (m["on", "idle"] - m["off", "idle"]) * 1024
    on_nobm = (m["on", "idle-nobitmap"] - m["off", "idle"]) * 1024
    on_written = (m["on", "written"] - m["off", "written"]) * 1024
    mrows = [["state", "off RSS MiB", "on RSS MiB", "on - off, MiB per TiB (measured)", "computed MiB per TiB"],
             ["idle, tracking on, no bitmap", fnum(m["off", "idle"] / 1024, 1), fnum(m["on", "idle-nobitmap"] / 1024, 1),
              fnum(per_tib(on_nobm), 2), f"{per_tib(states):.2f} (extent states)"],
             ["idle, one bitmap, no page allocated", fnum(m["off", "idle"] / 1024, 1), fnum(m["on", "idle"] / 1024, 1),
              fnum(per_tib(on_idle), 2), f"{per_tib(states + slots):.2f} (states + page slots)"],
             [f"after one 4K write in each of the {pages:,} pages", fnum(m["off", "written"] / 1024, 1),
              fnum(m["on", "written"] / 1024, 1), fnum(per_tib(on_written), 2),
              f"{per_tib(states + slots + leaves):.2f} (+ {per_tib(leaves):.2f} of leaves)"]]
    mnote = (f"Volume {size / 2**40:g} TiB sparse, {pages:,} bitmap pages, bitmap dirty bytes after the writes "
             f"{m['meta', 'dirty']:,} (expected {pages * 4096:,}). Peak RSS while `cbt create` built the "
             f"bitmap file: {m['on', 'create-peak'] / 1024:.1f} MiB.")

def text_table(rows):
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        lines.append("  ".join(c.rjust(w[i]) if i >= 3 and n else c.ljust(w[i]) for i, c in enumerate(r)))
        if n == 0:
            lines.append("  ".join("-" * x for x in w))
    return "\n".join(lines)

def md_table(rows, left=3):
    o = ["| " + " | ".join(rows[0]) + " |",
         "|" + "|".join("---" if i < left else "---:" for i in range(len(rows[0]))) + "|"]
    o += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(o)

when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
head = (f"{when}, blockferry {rev}, {os.cpu_count()} CPUs, fio nbd engine, 1 connection, "
        f"{runtime} s + {ramp} s ramp per overhead run, {rounds} round(s) interleaved, "
        f"{al_ios:,} writes per activity-log pass, took {elapsed // 60} min {elapsed % 60} s, "
        f"load average at end {load}")
print()
print(head)
print()
print(text_table(rows)); print()
print(text_table(arows)); print()
md = (f"{head}\n\nOverhead (tracking off = `change-tracking = false`; on = tracking and one bitmap):\n\n"
      f"{md_table(rows)}\n\nActivity log (4k random writes, qd32, writeback, 1024 x 4 MiB extents):\n\n"
      f"{md_table(arows, 2)}\n")
pf = os.path.join(out, "perf.txt")
if os.path.exists(pf):
    lines = []
    for line in open(pf):
        c, share, n = line.split()
        lines.append(f"- cache {c}: {float(share):.2f}% of the agent's CPU samples in the tracking code "
                     f"({n} symbols: blockferry_agent::cbt::*, nbd::conn::track)")
    note = ("Profile (one extra 4k randwrite qd32 run per cache mode on the \"on\" agent, perf record "
            "-F 1999, self time):\n\n" + "\n".join(lines))
    print(note); print()
    md += f"\n{note}\n"
if mrows:
    print(text_table(mrows)); print(mnote)
    md += f"\nMemory:\n\n{md_table(mrows, 1)}\n\n{mnote}\n"
with open(md_path, "w") as f:
    f.write(md)
print(f"\nmarkdown: {md_path}\nraw fio JSON, tracking counters, CPU, RSS: {out}")
EOF
