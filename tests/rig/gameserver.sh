#!/bin/sh
# A scripted "game server" for tests and benchmarks, run from a busybox image.
# Every behaviour is chosen by environment variables:
#   STARTUP_DELAY   seconds before the startup-done line (default 0)
#   STARTUP_LINE    the startup-done line (default "Done (0.1s)! For help, type help")
#   IGNORE_SIGTERM  1: SIGTERM is ignored (the agent must escalate to SIGKILL)
#   STOP_COMMAND    console command that stops the server cleanly (default "stop")
#   CRASH_AFTER     exit with CRASH_CODE (default 1) after this many seconds
#   FLOOD_LINES     print this many numbered lines as fast as possible after startup
#   FLOOD_WIDTH     with FLOOD_LINES: print lines of this many bytes instead of numbers
#   MEMORY_HOG_MB   allocate and touch this many MB at once (to hit a memory limit)
#   DATA_FILE       append every console command to this file (to prove the data dir mount)
#   TICK_INTERVAL   after startup, print "tick <n>" every this many seconds (n = 1, 2, ...)
# Console: every stdin line is echoed back as "> <line>"; "stop" exits 0;
# "crash <code>" exits with that code; "say <text>" prints "[Server] <text>".

echo "Starting scripted game server (pid $$)"

stop_requested() {
    echo "Stopping server (${1})"
    exit 0
}

if [ "${IGNORE_SIGTERM:-0}" = "1" ]; then
    trap 'echo "SIGTERM ignored"' TERM
else
    trap 'stop_requested SIGTERM' TERM
fi
trap 'stop_requested SIGINT' INT

if [ -n "${MEMORY_HOG_MB:-}" ]; then
    echo "allocating ${MEMORY_HOG_MB} MB"
    # exec: the allocation is the server itself, so an OOM kill ends the container.
    exec dd if=/dev/zero of=/dev/null bs="${MEMORY_HOG_MB}M" count=1
fi

if [ -n "${CRASH_AFTER:-}" ]; then
    ( sleep "${CRASH_AFTER}"; echo "Crashing with exit code ${CRASH_CODE:-1}"; kill -USR1 $$ ) &
    trap 'exit ${CRASH_CODE:-1}' USR1
fi

if [ "${STARTUP_DELAY:-0}" != "0" ]; then
    sleep "${STARTUP_DELAY}"
fi
echo "${STARTUP_LINE:-Done (0.1s)! For help, type help}"

if [ -n "${FLOOD_LINES:-}" ]; then
    if [ -n "${FLOOD_WIDTH:-}" ]; then
        yes "$(head -c "${FLOOD_WIDTH}" /dev/zero | tr '\0' x)" | head -n "${FLOOD_LINES}"
    else
        seq 1 "${FLOOD_LINES}"
    fi
    echo "flood done"
fi

if [ -n "${TICK_INTERVAL:-}" ]; then
    ( n=1; while :; do sleep "${TICK_INTERVAL}"; echo "tick ${n}"; n=$((n+1)); done ) &
fi

# The console runs in the background reading a dup of stdin, so that the main
# shell sits in `wait`, which trapped signals interrupt at once.
console() {
    while IFS= read -r line; do
        echo "> ${line}"
        if [ -n "${DATA_FILE:-}" ]; then
            echo "${line}" >> "${DATA_FILE}"
        fi
        case "${line}" in
            "${STOP_COMMAND:-stop}") echo "Stopping server (console)"; kill -INT $$; exit 0 ;;
            "crash "*) echo "Crashing with exit code ${line#crash }"; echo "${line#crash }" > /tmp/.crashcode; kill -USR2 $$; exit 0 ;;
            "say "*) echo "[Server] ${line#say }" ;;
        esac
    done
    # stdin closed: keep running like a real server does.
    while :; do sleep 3600; done
}
trap 'exit "$(cat /tmp/.crashcode)"' USR2

exec 3<&0
console <&3 &
while :; do
    wait
done
