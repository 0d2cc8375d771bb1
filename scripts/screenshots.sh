#!/usr/bin/env bash
# Renders the real app under Xvfb (software Vulkan: lavapipe) against a real server with two
# talking headless clients, and saves PNGs to assets/screenshots/.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=assets/screenshots
mkdir -p "$OUT"
echo "[screenshots] building (dev profile, same as the tests)"
cargo build --locked --bin p2p-voice
BIN=${CARGO_TARGET_DIR:-target}/debug/p2p-voice
PORT=${PORT:-7811}
DISPLAY_NUM=${DISPLAY_NUM:-:97}
CFG=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -n "${STARTED_PULSE:-}" ] && pulseaudio --kill 2>/dev/null || true
    rm -rf "$CFG"
}
trap cleanup EXIT

# A virtual sound card so the app shows working devices (optional).
if command -v pulseaudio >/dev/null && ! pactl info >/dev/null 2>&1; then
    pulseaudio --daemonize=yes --exit-idle-time=-1 --system=false --disallow-exit -n \
        --load="module-null-sink sink_name=vsink" --load="module-native-protocol-unix" \
        --load="module-always-sink" 2>/dev/null && STARTED_PULSE=1 || true
fi

echo "[screenshots] starting Xvfb on $DISPLAY_NUM"
Xvfb "$DISPLAY_NUM" -screen 0 1280x800x24 -nolisten tcp >/dev/null 2>&1 &
PIDS+=($!)
sleep 1

echo "[screenshots] starting a server on 127.0.0.1:$PORT and two talking clients"
"$BIN" server --bind 127.0.0.1 --port "$PORT" >/dev/null 2>&1 &
PIDS+=($!)
sleep 0.5
# bob and dave chat once the window's user (a third member) is in Lobby with them. Each
# member has a config directory of its own in $CFG: a fresh identity remembering nobody, so
# the window's user (new each run) is not taken for a changed identity, whose voice is held
# back.
P2P_VOICE_CONFIG_DIR="$CFG/member-bob" "$BIN" client --headless --server "127.0.0.1:$PORT" --username bob --channel Lobby \
    --input-tone 300 --always-transmit --duration 60 --say-peers 2 \
    --say "Hi! Slides for tonight: https://example.org/slides/retro-2026" \
    --say "I'll share my screen in five minutes, grab a coffee first if you like. Long messages wrap inside the panel, and the panel scrolls and sticks to the newest one." >/dev/null 2>&1 &
PIDS+=($!)
P2P_VOICE_CONFIG_DIR="$CFG/member-carol" "$BIN" client --headless --server "127.0.0.1:$PORT" --username carol --channel Gaming \
    --input-silence --duration 60 >/dev/null 2>&1 &
PIDS+=($!)
P2P_VOICE_CONFIG_DIR="$CFG/member-dave" "$BIN" client --headless --server "127.0.0.1:$PORT" --username dave --channel Lobby \
    --input-tone 520 --always-transmit --duration 60 --say-peers 2 \
    --say "Sounds good, I can hear you both fine :)" >/dev/null 2>&1 &
PIDS+=($!)
sleep 1

shot() {
    local name=$1; shift
    echo "[screenshots] $name"
    # The window asks before trusting a server it has never seen; a headless client (which
    # pins on first use) run once with the same config directory has it seen already. Not
    # for the connect screen, which shows the prompt-free form.
    local dir="$CFG/${CFGNAME:-$name}"
    if [ "$name" != connect ]; then
        P2P_VOICE_CONFIG_DIR="$dir" "$BIN" client --headless --server "127.0.0.1:$PORT" \
            --username "pin-$name" --input-silence --duration 1 >/dev/null 2>&1 || true
    fi
    env ${PERF:+P2P_VOICE_PERF_OVERLAY=1} ${MESH:+P2P_VOICE_MESH_VIEW=1} ${ECHO:+P2P_VOICE_ECHO_TEST=1} DISPLAY="$DISPLAY_NUM" WGPU_BACKEND=vulkan P2P_VOICE_CONFIG_DIR="$dir" \
        P2P_VOICE_SCREENSHOT="$OUT/$name.png" P2P_VOICE_SCREENSHOT_AFTER="${AFTER:-5}" \
        "$BIN" "$@" >/dev/null 2>&1 || echo "[screenshots] $name: app exited with $?"
}

shot connect client --server "127.0.0.1:$PORT"
# First in Lobby: bob's and dave's --say messages go to alice's window (chat.png).
shot chat client --server "127.0.0.1:$PORT" --username alice --channel Lobby
# The same alice as in chat.png (one identity): the members must not see hers change.
CFGNAME=chat shot overview client --server "127.0.0.1:$PORT" --username alice --channel Lobby
shot password client --server "127.0.0.1:$PORT" --username erin --channel Private
PERF=1 shot perf-overlay client --server "127.0.0.1:$PORT" --username frank --channel Lobby
AFTER=6 shot host host --port $((PORT + 1)) --username host-user
# Audio setup: push-to-talk on F9 (grabbed for the whole desktop) and the echo test's result.
# The virtual sound card's microphone is its speaker's monitor: an echo with no room at all.
mkdir -p "$CFG/audio-setup"
printf 'push_to_talk = true\nptt_key = "F9"\n' > "$CFG/audio-setup/settings.toml"
ECHO=1 AFTER=9 shot audio-setup client --server "127.0.0.1:$PORT" --username grace --channel Gaming

# The mesh view: the window's user in Music with five headless members. Three talk (their
# nodes pulse), mallory receives nothing (--impair loss=1: no answer to punching, so
# unreachable after 10 s), and the window itself loses 4 % with 15 ms jitter so the lines'
# loss figures are not all zero.
echo "[screenshots] starting five members in Music"
for m in "grace --input-tone 330 --always-transmit" "heidi --input-tone 440 --always-transmit" \
    "ivan --input-silence" "judy --input-tone 600 --always-transmit" \
    "mallory --input-silence --impair loss=1"; do
    # Each with a config directory of its own: a fresh identity that remembers nobody, so
    # the window's new identity is not taken for a changed one (which holds voice back).
    # shellcheck disable=SC2086
    P2P_VOICE_CONFIG_DIR="$CFG/member-${m%% *}" "$BIN" client --headless \
        --server "127.0.0.1:$PORT" --channel Music --duration 40 --username $m >/dev/null 2>&1 &
    PIDS+=($!)
done
sleep 1
MESH=1 AFTER=14 shot mesh client --server "127.0.0.1:$PORT" --username you --channel Music \
    --impair loss=0.04,jitter_ms=15,seed=7
ls -l "$OUT"
