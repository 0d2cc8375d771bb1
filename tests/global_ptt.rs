//! Push-to-talk outside the window, on a real X server: Xvfb with no window of ours at all
//! (so nothing of ours has focus), keys typed through XTEST by `xdotool` as a keyboard would.
//! Needs `Xvfb` and `xdotool` (`make deps-test` installs both); skips without them outside CI
//! and fails under CI.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use global_hotkey::hotkey::Code;
use p2p_voice::ui::global_ptt::GlobalPtt;
use p2p_voice::ui::ptt_scope::{PttScope, WindowOnly};

/// An Xvfb display that is stopped when dropped.
struct Xvfb {
    child: Child,
    display: String,
}

impl Drop for Xvfb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts Xvfb on a free display number, waiting for its socket.
fn start_xvfb() -> Result<Xvfb, String> {
    let number = (90..140)
        .find(|n| !std::path::Path::new(&format!("/tmp/.X11-unix/X{n}")).exists())
        .ok_or("no free X display number in 90..140")?;
    let display = format!(":{number}");
    let child = Command::new("Xvfb")
        .args([&display, "-screen", "0", "640x480x24", "-nolisten", "tcp"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start Xvfb: {e}"))?;
    let x = Xvfb { child, display };
    let socket = format!("/tmp/.X11-unix/X{number}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::path::Path::new(&socket).exists() {
        if Instant::now() > deadline {
            return Err("Xvfb did not open its socket within 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(x)
}

fn xdotool(display: &str, args: &[&str]) {
    let status = Command::new("xdotool")
        .args(args)
        .env("DISPLAY", display)
        .status()
        .expect("xdotool runs");
    assert!(status.success(), "xdotool {args:?}: {status}");
}

/// Waits for the answer about the wanted key.
fn scope_within(grab: &mut GlobalPtt, limit: Duration) -> Option<PttScope> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(scope) = grab.poll_scope() {
            return Some(scope);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn a_grabbed_key_is_seen_pressed_and_released_with_no_window_of_ours_focused() {
    if Command::new("xdotool").arg("version").output().is_err() {
        return common::skip_unless_ci("xdotool is not installed (make deps-test)");
    }
    let x = match start_xvfb() {
        Ok(x) => x,
        Err(e) => return common::skip_unless_ci(&e),
    };
    // The library's X thread connects to `$DISPLAY`; this test is the only one in its process.
    std::env::set_var("DISPLAY", &x.display);

    let (tx, presses) = crossbeam_channel::unbounded();
    let mut grab = GlobalPtt::spawn(move |pressed| {
        let _ = tx.send(pressed);
    })
    .expect("grab thread starts");
    assert!(grab.want(Some(Code::F9)));
    assert_eq!(
        scope_within(&mut grab, Duration::from_secs(5)),
        Some(PttScope::Everywhere)
    );

    xdotool(&x.display, &["keydown", "F9"]);
    assert_eq!(presses.recv_timeout(Duration::from_secs(5)), Ok(true));
    xdotool(&x.display, &["keyup", "F9"]);
    assert_eq!(presses.recv_timeout(Duration::from_secs(5)), Ok(false));
    // Another key is not ours.
    xdotool(&x.display, &["key", "F10"]);

    // A second application asking for the same key is refused, and says why.
    let mut rival = GlobalPtt::spawn(|_| {}).expect("second grab thread starts");
    rival.want(Some(Code::F9));
    match scope_within(&mut rival, Duration::from_secs(5)) {
        Some(PttScope::WindowOnly(WindowOnly::GrabFailed(why))) => {
            assert!(why.contains("another application"), "{why}")
        }
        other => panic!("the second grab of F9 should fail, got {other:?}"),
    }
    // Its thread shares the library's event channel with ours: let it end first.
    drop(rival);
    std::thread::sleep(Duration::from_millis(200));

    // Holding the key while it is taken away releases it: the release would go unseen.
    xdotool(&x.display, &["keydown", "F9"]);
    assert_eq!(presses.recv_timeout(Duration::from_secs(5)), Ok(true));
    assert!(grab.want(Some(Code::F8)));
    assert_eq!(presses.recv_timeout(Duration::from_secs(5)), Ok(false));
    xdotool(&x.display, &["keyup", "F9"]);
    assert_eq!(
        scope_within(&mut grab, Duration::from_secs(5)),
        Some(PttScope::Everywhere)
    );

    // Released: the key goes back to the other applications and means nothing to us.
    assert!(grab.want(None));
    std::thread::sleep(Duration::from_millis(200));
    xdotool(&x.display, &["key", "F8", "F9"]);
    assert!(
        presses.recv_timeout(Duration::from_millis(500)).is_err(),
        "a released grab must not report keys"
    );
}
