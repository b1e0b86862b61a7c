# Sourced by the launch scripts (bash); not a command of its own.
#
#   meo_launch local|runner CMD...
#
# Runs the deepspeed launcher CMD and waits for it, so that SIGTERM, SIGINT or SIGHUP sent to the
# script (to its pid, or to its process group: Ctrl-C in a terminal, a scheduler's kill) stops the
# run with a checkpoint instead of orphaning the ranks.
#
# Why a wrapper: `deepspeed` (deepspeed.launcher.runner, 0.19) sets no signal handler on a single
# node, so a SIGTERM ends the runner alone and the ranks train on without it; its child
# `deepspeed.launcher.launch` does forward SIGTERM/SIGINT to the ranks, but SIGKILLs them 30 s later
# (a constant in DeepSpeed, whatever the checkpoint's size) and exits 1. So CMD runs in a process
# group of its own (set -m), where signals meant for the script do not reach it, and on a signal:
#   local   the script sends SIGTERM to the ranks (the launch process's children) itself; the
#           trainer of each rank finishes its step, the ranks agree to stop, save a checkpoint and
#           exit 0, the launcher then exits 0 and so does the script;
#   runner  (ranks on other hosts, pdsh) the script forwards the signal to the runner, which stops
#           pdsh and runs `pkill -f deepspeed.launcher.launch` on every host: the ranks get SIGTERM
#           from their launch process, which SIGKILLs them 30 s later; the runner exits 1 at once.
# STOP_GRACE_S (default 600) bounds the wait after the first signal: then the launcher's whole
# process group is SIGKILLed and the script exits 137. Further signals are forwarded the same way.
# The script's own exit status is the launcher's.

_meo_pid=""
_meo_mode=""
_meo_killer=""

# pids of the ranks on this host: the children of the runner's child (deepspeed.launcher.launch)
_meo_ranks() {
    local launch
    launch="$(pgrep -d, -P "${_meo_pid}" || true)"
    [ -n "${launch}" ] && pgrep -P "${launch}" || true
}

_meo_stop() {
    local sig="$1" ranks=""
    if [ "${_meo_mode}" = runner ]; then
        echo "[launch] ${sig}: forwarded to the deepspeed runner (pid ${_meo_pid})" >&2
        kill "-${sig}" "${_meo_pid}" 2>/dev/null || true
    else
        ranks="$(_meo_ranks | tr '\n' ' ')"
        if [ -n "${ranks}" ]; then
            echo "[launch] ${sig}: SIGTERM to the ranks (${ranks% }): they save a checkpoint and exit" >&2
            kill -TERM ${ranks} 2>/dev/null || true
        else  # no rank started yet: nothing to save
            echo "[launch] ${sig}: no rank started yet; stopping the launcher" >&2
            kill -TERM -- "-${_meo_pid}" 2>/dev/null || true
        fi
    fi
    if [ -z "${_meo_killer}" ]; then
        set -m
        (
            trap - TERM INT HUP
            sleep "${STOP_GRACE_S:-600}"
            echo "[launch] the ranks did not stop within STOP_GRACE_S=${STOP_GRACE_S:-600} s: SIGKILL" >&2
            kill -KILL -- "-${_meo_pid}" 2>/dev/null
        ) &
        _meo_killer=$!
        set +m
    fi
}

meo_launch() {
    _meo_mode="$1"
    shift
    set -m  # background jobs get their own process group
    "$@" &
    _meo_pid=$!
    set +m
    trap '_meo_stop TERM' TERM
    trap '_meo_stop INT' INT
    trap '_meo_stop HUP' HUP
    local rc
    while :; do
        wait "${_meo_pid}" && rc=0 || rc=$?  # returns early (> 128) when a trapped signal arrives
        kill -0 "${_meo_pid}" 2>/dev/null || break
    done
    trap - TERM INT HUP
    if [ -n "${_meo_killer}" ]; then kill -- "-${_meo_killer}" 2>/dev/null || true; fi
    return "${rc}"
}
