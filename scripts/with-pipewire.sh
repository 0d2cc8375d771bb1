#!/usr/bin/env bash
# Runs a command against a PipeWire sound server of its own, as a current desktop runs one:
# PipeWire, its session manager WirePlumber (which picks the default devices) and
# pipewire-pulse (the PulseAudio protocol our audio host speaks), on a session D-Bus of their
# own, all in a private runtime directory and stopped afterwards. `make test` runs the
# real-device tests (tests/audio_devices.rs) through it, so they run once on PulseAudio and
# once on PipeWire. Without the packages it says so and exits 0, except under CI (CI set),
# where it fails: CI has every package installed.
set -uo pipefail

fail() {
    if [ -n "${CI:-}" ]; then
        echo "[pipewire] FAILED: $*" >&2
        exit 1
    fi
    echo "[pipewire] skipped: $*" >&2
    exit 0
}

for tool in pipewire wireplumber pipewire-pulse dbus-daemon pactl; do
    command -v "$tool" >/dev/null || fail "$tool is not installed (make deps-test installs it)"
done

RT=$(mktemp -d /tmp/p2pv-pipewire.XXXXXX)
chmod 700 "$RT"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null
    rm -rf "$RT"
}
trap cleanup EXIT

# Waits up to 10 s for a path to appear.
wait_for() {
    for _ in $(seq 100); do [ -e "$1" ] && return 0; sleep 0.1; done
    return 1
}

export XDG_RUNTIME_DIR="$RT"
unset PULSE_SERVER DISPLAY WAYLAND_DISPLAY
export DBUS_SESSION_BUS_ADDRESS="unix:path=$RT/bus"
dbus-daemon --session --nofork --nopidfile --address="$DBUS_SESSION_BUS_ADDRESS" >"$RT/dbus.log" 2>&1 &
PIDS+=($!)
wait_for "$RT/bus" || fail "the session D-Bus did not start: $(cat "$RT/dbus.log")"
pipewire >"$RT/pipewire.log" 2>&1 &
PIDS+=($!)
wait_for "$RT/pipewire-0" || fail "pipewire did not start: $(tail -5 "$RT/pipewire.log")"
wireplumber >"$RT/wireplumber.log" 2>&1 &
PIDS+=($!)
pipewire-pulse >"$RT/pipewire-pulse.log" 2>&1 &
PIDS+=($!)
wait_for "$RT/pulse/native" || fail "pipewire-pulse did not start: $(tail -5 "$RT/pipewire-pulse.log")"
export PULSE_SERVER="unix:$RT/pulse/native"

# Ready when WirePlumber has chosen a default sink and source.
ready=""
for _ in $(seq 100); do
    info=$(pactl info 2>/dev/null)
    if grep -q "Server Name: .*PipeWire" <<<"$info" &&
        grep -q "^Default Sink: ." <<<"$info" && grep -q "^Default Source: ." <<<"$info"; then
        ready=1
        break
    fi
    sleep 0.1
done
[ -n "$ready" ] || fail "PipeWire chose no default devices: $(pactl info 2>&1; tail -5 "$RT/wireplumber.log")"
echo "[pipewire] $(grep 'Server Name' <<<"$info"): running $*"
# The tests check that they talk to this server and did not start a PulseAudio of their own.
P2P_VOICE_EXPECT_SOUND_SERVER=PipeWire "$@"
