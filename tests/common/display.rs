//! Display servers for tests that open the real window: Xvfb (X11) and a headless Weston
//! (Wayland), each stopped when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A display server process and what a client needs to reach it.
pub struct Display {
    child: Child,
    /// `DISPLAY` (X11: ":93") or `WAYLAND_DISPLAY` (a socket name in `runtime_dir`).
    pub name: String,
    /// `XDG_RUNTIME_DIR` for Wayland clients (where the socket is).
    pub runtime_dir: Option<PathBuf>,
}

impl Drop for Display {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(dir) = &self.runtime_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn wait_for(path: &Path, what: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(format!(
                "{what} did not open {} within 10 s",
                path.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Starts Xvfb on a free display number.
pub fn xvfb() -> Result<Display, String> {
    let number = (90..140)
        .find(|n| !Path::new(&format!("/tmp/.X11-unix/X{n}")).exists())
        .ok_or("no free X display number in 90..140")?;
    let name = format!(":{number}");
    let child = Command::new("Xvfb")
        .args([&name, "-screen", "0", "1100x720x24", "-nolisten", "tcp"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start Xvfb: {e}"))?;
    let display = Display {
        child,
        name,
        runtime_dir: None,
    };
    wait_for(Path::new(&format!("/tmp/.X11-unix/X{number}")), "Xvfb")?;
    Ok(display)
}

/// Starts Weston with its headless backend (no screen, no input devices) in a runtime
/// directory of its own.
pub fn weston() -> Result<Display, String> {
    let runtime_dir = crate::common::temp_path("wayland-runtime");
    std::fs::create_dir_all(&runtime_dir).map_err(|e| e.to_string())?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&runtime_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| e.to_string())?;
    let name = "p2pv-wayland".to_owned();
    let child = Command::new("weston")
        .args([
            "--backend=headless-backend.so",
            &format!("--socket={name}"),
            "--width=1100",
            "--height=720",
            "--idle-time=0",
        ])
        .env("XDG_RUNTIME_DIR", &runtime_dir)
        .env_remove("DISPLAY")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start weston: {e}"))?;
    let display = Display {
        child,
        name: name.clone(),
        runtime_dir: Some(runtime_dir.clone()),
    };
    wait_for(&runtime_dir.join(&name), "weston")?;
    Ok(display)
}

impl Display {
    /// Points `cmd` at this display alone: the other kind's variables are removed, so a
    /// window that opens at all opened here.
    pub fn apply(&self, cmd: &mut Command) {
        match &self.runtime_dir {
            Some(dir) => {
                cmd.env("WAYLAND_DISPLAY", &self.name)
                    .env("XDG_RUNTIME_DIR", dir)
                    .env_remove("DISPLAY");
            }
            None => {
                cmd.env("DISPLAY", &self.name)
                    .env_remove("WAYLAND_DISPLAY")
                    .env_remove("WAYLAND_SOCKET");
            }
        }
    }
}
