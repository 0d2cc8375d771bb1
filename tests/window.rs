//! The real desktop window, on both display servers it supports: X11 (Xvfb) and Wayland (a
//! headless Weston, with `DISPLAY` unset so X11 is not there to fall back to). Each run opens
//! the window with a server address, a username and a channel on the command line, and the
//! test asserts from the server's side that the window's user joined that channel, then that
//! the window drew a frame (the screenshot hook saves the rendered window as a PNG) and exited
//! cleanly. Needs Xvfb, Weston and a Vulkan driver (lavapipe); skips without them outside CI.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::display::Display;
use p2p_voice::protocol::ServerMsg;

/// Runs the window on `display` until it has joined Lobby and saved a picture of itself.
fn window_joins_and_draws(display: Display, kind: &str) {
    let server = common::ServerProcess::start();
    let config = common::temp_path(&format!("window-{kind}"));
    // Pin the server's certificate first (the window would ask before trusting it).
    let pinned = common::p2p()
        .args(["client", "--headless", "--server", &server.addr.to_string()])
        .args(["--username", "pinner", "--input-silence", "--duration", "1"])
        .env("P2P_VOICE_CONFIG_DIR", &config)
        .output()
        .expect("headless pin run");
    assert!(pinned.status.success(), "pin run: {pinned:?}");

    let (mut observer, _, _) = common::RawClient::login(server.addr, "observer");
    let shot = common::temp_path(&format!("window-{kind}.png"));
    let mut cmd = common::p2p();
    cmd.args(["client", "--server", &server.addr.to_string()])
        .args(["--username", &format!("on-{kind}"), "--channel", "Lobby"])
        .env("P2P_VOICE_CONFIG_DIR", &config)
        .env("P2P_VOICE_SCREENSHOT", &shot)
        .env("P2P_VOICE_SCREENSHOT_AFTER", "10")
        .env("WGPU_BACKEND", "vulkan")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    display.apply(&mut cmd);
    let window = cmd.spawn().expect("start the window");

    let name = format!("on-{kind}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut joined = false;
    while !joined && Instant::now() < deadline {
        if let Some(ServerMsg::MemberJoined { channel, member }) =
            observer.recv(Duration::from_millis(200))
        {
            joined = channel == "Lobby" && member.username == name;
        }
    }
    let out = window.wait_with_output().expect("window exits");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        joined,
        "the window on {kind} never joined Lobby; its log:\n{log}"
    );
    assert!(
        out.status.success(),
        "window on {kind}: {}\n{log}",
        out.status
    );
    let png = std::fs::read(&shot).unwrap_or_default();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "no picture of the window on {kind} ({} bytes)",
        png.len()
    );
    let _ = std::fs::remove_file(&shot);
    let _ = std::fs::remove_dir_all(&config);
}

#[test]
fn the_window_joins_a_call_and_draws_on_x11() {
    match common::display::xvfb() {
        Ok(display) => window_joins_and_draws(display, "x11"),
        Err(e) => common::skip_unless_ci(&e),
    }
}

#[test]
fn the_window_joins_a_call_and_draws_on_wayland() {
    if Command::new("weston").arg("--version").output().is_err() {
        return common::skip_unless_ci("weston is not installed (make deps-test)");
    }
    match common::display::weston() {
        Ok(display) => window_joins_and_draws(display, "wayland"),
        Err(e) => common::skip_unless_ci(&e),
    }
}

/// A display variable that names nothing (a stale one over SSH, a compositor that crashed)
/// gets a sentence, not a panic from deep inside the windowing library; host mode goes on as
/// a server.
#[test]
fn a_display_that_is_not_there_gets_a_clear_error() {
    let out = common::p2p()
        .args(["client", "--server", "127.0.0.1:9", "--username", "nobody"])
        .env("WAYLAND_DISPLAY", "wayland-nowhere")
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .env("DISPLAY", ":4321")
        .output()
        .expect("run the client");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no display server answers")
            && err.contains("WAYLAND_DISPLAY=wayland-nowhere")
            && err.contains("--headless"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}
