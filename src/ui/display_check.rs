//! Whether a window can open at all: the display server it would use answers. Checked before
//! Bevy starts, because winit panics when `WAYLAND_DISPLAY` or `DISPLAY` names a server that
//! is not there (a stale variable over SSH, a crashed compositor), where the user should get
//! a sentence saying so, and host mode should go on as a server.
//!
//! The order is winit's: Wayland when `WAYLAND_DISPLAY` is set, else (or when that fails) X11
//! from `DISPLAY`.

use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

/// The outcome of the check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisplayCheck {
    /// A display server answered: `"Wayland"` or `"X11"`.
    Reachable(&'static str),
    /// Neither variable is set.
    Unset,
    /// Set, but nothing answers; says what was tried.
    Unreachable(String),
}

/// Checks this process's display variables.
pub fn check_display() -> DisplayCheck {
    let var = |name| std::env::var(name).ok().filter(|v| !v.is_empty());
    check(
        var("WAYLAND_DISPLAY"),
        var("XDG_RUNTIME_DIR"),
        var("DISPLAY"),
    )
}

/// The check on given variable values.
pub fn check(
    wayland: Option<String>,
    runtime_dir: Option<String>,
    x11: Option<String>,
) -> DisplayCheck {
    if wayland.is_none() && x11.is_none() {
        return DisplayCheck::Unset;
    }
    let mut tried = Vec::new();
    if let Some(name) = &wayland {
        let path = wayland_socket(name, runtime_dir.as_deref());
        match UnixStream::connect(&path) {
            Ok(_) => return DisplayCheck::Reachable("Wayland"),
            Err(e) => tried.push(format!("WAYLAND_DISPLAY={name} ({}: {e})", path.display())),
        }
    }
    if let Some(display) = &x11 {
        match connect_x11(display) {
            Ok(()) => return DisplayCheck::Reachable("X11"),
            Err(e) => tried.push(format!("DISPLAY={display} ({e})")),
        }
    }
    DisplayCheck::Unreachable(format!("no display server answers: {}", tried.join("; ")))
}

/// Where a Wayland socket is: an absolute name as is, else inside `XDG_RUNTIME_DIR`.
fn wayland_socket(name: &str, runtime_dir: Option<&str>) -> PathBuf {
    let name = PathBuf::from(name);
    if name.is_absolute() {
        return name;
    }
    PathBuf::from(runtime_dir.unwrap_or("/run/user/0")).join(name)
}

/// Connects to an X server the way Xlib resolves `DISPLAY`: `:N` (or `unix:N`) is the local
/// socket `/tmp/.X11-unix/XN`, `host:N` is TCP port 6000 + N.
fn connect_x11(display: &str) -> Result<(), String> {
    let (host, rest) = display
        .rsplit_once(':')
        .ok_or_else(|| "not of the form host:number".to_owned())?;
    let number: u16 = rest
        .split('.')
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| "no display number".to_owned())?;
    if host.is_empty() || host == "unix" {
        let path = format!("/tmp/.X11-unix/X{number}");
        return UnixStream::connect(&path)
            .map(|_| ())
            .map_err(|e| format!("{path}: {e}"));
    }
    let addr = (host, 6000 + number)
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .next()
        .ok_or_else(|| format!("{host} has no address"))?;
    TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map(|_| ())
        .map_err(|e| format!("{addr}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_set_is_unset() {
        assert_eq!(check(None, None, None), DisplayCheck::Unset);
    }

    #[test]
    fn names_that_nothing_answers_are_unreachable_and_say_what_was_tried() {
        let dir = std::env::temp_dir().join(format!("p2pv-display-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let got = check(
            Some("wayland-nowhere".into()),
            Some(dir.to_string_lossy().into_owned()),
            Some(":4321".into()),
        );
        let DisplayCheck::Unreachable(why) = got else {
            panic!("{got:?}")
        };
        assert!(
            why.contains("WAYLAND_DISPLAY=wayland-nowhere") && why.contains("DISPLAY=:4321"),
            "{why}"
        );
        let got = check(None, None, Some("garbage".into()));
        assert!(matches!(got, DisplayCheck::Unreachable(_)), "{got:?}");
    }

    #[test]
    fn a_listening_wayland_socket_is_reachable() {
        let dir = std::env::temp_dir().join(format!("p2pv-display-ok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("wayland-test");
        let _ = std::fs::remove_file(&socket);
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let got = check(
            Some("wayland-test".into()),
            Some(dir.to_string_lossy().into_owned()),
            Some(":4321".into()),
        );
        assert_eq!(got, DisplayCheck::Reachable("Wayland"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
