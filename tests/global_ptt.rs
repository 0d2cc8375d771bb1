//! Push-to-talk outside the window, on a real X server: Xvfb with no window of ours at all
//! (so nothing of ours has focus), keys typed through XTEST by `xdotool` as a keyboard would.
//! Needs `Xvfb` and `xdotool` (`make deps-test` installs both); skips without them outside CI
//! and fails under CI.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use global_hotkey::hotkey::Code;
use p2p_voice::ui::global_ptt::GlobalPtt;
use p2p_voice::ui::ptt_scope::{PttScope, WindowOnly};

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
    let x = match common::display::xvfb() {
        Ok(x) => x,
        Err(e) => return common::skip_unless_ci(&e),
    };
    // The library's X thread connects to `$DISPLAY`; this test is the only one in its process.
    std::env::set_var("DISPLAY", &x.name);

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

    xdotool(&x.name, &["keydown", "F9"]);
    assert_eq!(presses.recv_timeout(Duration::from_secs(5)), Ok(true));
    xdotool(&x.name, &["keyup", "F9"]);
    assert_eq!(presses.recv_timeout(Duration::from_secs(5)), Ok(false));
    // Another key is not ours.
    xdotool(&x.name, &["key", "F10"]);

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
    xdotool(&x.name, &["keydown", "F9"]);
    assert_eq!(presses.recv_timeout(Duration::from_secs(5)), Ok(true));
    assert!(grab.want(Some(Code::F8)));
    assert_eq!(presses.recv_timeout(Duration::from_secs(5)), Ok(false));
    xdotool(&x.name, &["keyup", "F9"]);
    assert_eq!(
        scope_within(&mut grab, Duration::from_secs(5)),
        Some(PttScope::Everywhere)
    );

    // Released: the key goes back to the other applications and means nothing to us.
    assert!(grab.want(None));
    std::thread::sleep(Duration::from_millis(200));
    xdotool(&x.name, &["key", "F8", "F9"]);
    assert!(
        presses.recv_timeout(Duration::from_millis(500)).is_err(),
        "a released grab must not report keys"
    );
}
