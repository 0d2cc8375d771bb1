# p2p-voice: two commands do all the set-up on a fresh Debian/Ubuntu machine.
#   make run    installs what is missing, builds in release mode, starts `p2p-voice host`
#   make test   installs what is missing, runs every test
SHELL := /bin/bash
.DEFAULT_GOAL := help

CARGO ?= cargo
# Build: cmake builds the bundled libopus; ALSA headers for cpal; Wayland and xkbcommon headers
# for the window on Wayland desktops (X11 is loaded at run time).
BUILD_PKGS := build-essential pkg-config cmake libasound2-dev libwayland-dev libxkbcommon-dev
# The window: X11 client libraries and a Vulkan driver (software fallback: lavapipe).
RUN_PKGS := $(BUILD_PKGS) libwayland-client0 libwayland-cursor0 libwayland-egl1 libx11-6 libxcursor1 libxrandr2 libxi6 libxkbcommon-x11-0 libvulkan1 mesa-vulkan-drivers
# Real recorded speech for the PESQ-WB benchmark (benches/voice_quality.rs): alsa-utils ships a
# voice reading the speaker names (48 kHz), codec2-examples ships wideband (16 kHz) and
# narrowband (8 kHz) test speech.
SPEECH_PKGS := alsa-utils codec2-examples
# Tests: PulseAudio null sink for the real-device test, iproute2/nftables for the NAT test,
# miniupnpd (PCP, NAT-PMP, UPnP-IGD; the nftables build, which starts no service) for the
# port-mapping test, Xvfb and xdotool for screenshots, the window test and global push-to-talk,
# Weston (headless) for the window on Wayland, PipeWire with WirePlumber and pipewire-pulse
# for the real-device tests on PipeWire.
TEST_PKGS := $(RUN_PKGS) pulseaudio pulseaudio-utils libasound2-plugins iproute2 nftables miniupnpd-nftables tcpdump xvfb xauth xdotool weston pipewire pipewire-pulse wireplumber dbus-daemon $(SPEECH_PKGS)

.PHONY: help deps-run deps-test run server test lint bench screenshots fmt fuzz

# Seconds each fuzz target runs for `make fuzz` (`make test` runs a 10 s pass of each).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := control_frames voice_datagrams sealed_voice voice_engine control_session

help:
	@echo "make run          build (release) and start the desktop app with its embedded server"
	@echo "make test         run all tests (installs missing system packages first)"
	@echo "make server       build (release) and start a dedicated metadata server"
	@echo "make lint         cargo fmt --check and cargo clippy -D warnings"
	@echo "make bench        run the benchmarks (figures go to docs/BENCHMARKS.md by hand)"
	@echo "make screenshots  render the window under Xvfb and save PNGs to assets/screenshots/"
	@echo "make fuzz         run each libFuzzer target for FUZZ_SECONDS (default 60)"

deps-run:
	@bash scripts/ensure-packages.sh $(RUN_PKGS)
	@command -v $(CARGO) >/dev/null || { echo "[setup] cargo not found: install Rust from https://rustup.rs"; exit 1; }

deps-test:
	@bash scripts/ensure-packages.sh $(TEST_PKGS)
	@command -v $(CARGO) >/dev/null || { echo "[setup] cargo not found: install Rust from https://rustup.rs"; exit 1; }

run: deps-run
	@echo "[run] building p2p-voice (release)"
	$(CARGO) build --release --locked
	@if [ -n "$$DISPLAY$$WAYLAND_DISPLAY" ]; then \
		echo "[run] starting: p2p-voice host (window + embedded server on port 7700)"; \
		./target/release/p2p-voice host; \
	else \
		echo "[run] no display (DISPLAY/WAYLAND_DISPLAY unset): starting the headless metadata server instead"; \
		./target/release/p2p-voice server; \
	fi

server: deps-run
	$(CARGO) build --release --locked
	./target/release/p2p-voice server

test: deps-test
	@echo "[test] checking formatting"
	$(CARGO) fmt --check
	@echo "[test] building and running all tests (unit, integration, doc, bench smoke runs)"
	$(CARGO) test --locked --all-targets
	$(CARGO) test --locked --doc
	@echo "[test] the real-device tests again, on PipeWire (its own PipeWire, WirePlumber and pipewire-pulse)"
	bash scripts/with-pipewire.sh $(CARGO) test --locked --test audio_devices
	@echo "[test] short fuzzing pass of the wire decoders"
	$(MAKE) --no-print-directory fuzz FUZZ_SECONDS=10

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

fmt:
	$(CARGO) fmt

bench: deps-test
	$(CARGO) bench --locked

screenshots: deps-test
	bash scripts/screenshots.sh

# cargo-fuzz needs the sanitizer flags of a nightly compiler; RUSTC_BOOTSTRAP lets the stable
# toolchain (the only one on these machines) accept them, for the fuzz build only. The fuzz
# crate builds the library without its `app` feature: just the decoders, no Bevy or audio.
fuzz: deps-test
	@command -v cargo-fuzz >/dev/null || { echo "[fuzz] installing cargo-fuzz"; $(CARGO) install cargo-fuzz --locked; }
	@cd fuzz && for t in $(FUZZ_TARGETS); do \
		echo "[fuzz] $$t for $(FUZZ_SECONDS) s"; \
		RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run -O $$t -- -max_total_time=$(FUZZ_SECONDS) 2>&1 | grep -E "^(Done|==|SUMMARY|thread)|panicked|ERROR" ; \
		test $${PIPESTATUS[0]} -eq 0 || { echo "[fuzz] $$t found a crash: see fuzz/artifacts/$$t"; exit 1; }; \
	done
