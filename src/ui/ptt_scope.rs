//! Where the push-to-talk key works: everywhere on the desktop, or only while our window has
//! focus, and why. Pure decisions from the key, the display server and what the key grab
//! answered; `global_ptt` is the shell that grabs the key.
//!
//! A global grab (X11 `XGrabKey`) takes the key away from every other application for as long
//! as it is held: grabbing Space or a letter would stop the user typing it anywhere, our own
//! chat line included. So only keys nobody types with can be grabbed (the function keys, which
//! is also what gaming mice and headsets send for their talk buttons, and Insert); with any
//! other key push-to-talk stays window-only and the controls say how to change that.

use global_hotkey::hotkey::Code;

/// The display server our window runs on, decided from the environment the way winit decides
/// (Wayland first when `WAYLAND_DISPLAY` or `WAYLAND_SOCKET` is set, then X11 with `DISPLAY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisplayServer {
    X11,
    Wayland,
    /// Neither is set (the window could not open anyway; a headless test).
    Unknown,
}

impl DisplayServer {
    /// Decides from the values of `WAYLAND_DISPLAY`, `WAYLAND_SOCKET` and `DISPLAY`.
    pub fn from_env_values(
        wayland_display: Option<&str>,
        wayland_socket: Option<&str>,
        display: Option<&str>,
    ) -> Self {
        let set = |v: Option<&str>| v.is_some_and(|v| !v.is_empty());
        if set(wayland_display) || set(wayland_socket) {
            Self::Wayland
        } else if set(display) {
            Self::X11
        } else {
            Self::Unknown
        }
    }

    /// This process's display server.
    pub fn current() -> Self {
        let var = |name| std::env::var(name).ok();
        Self::from_env_values(
            var("WAYLAND_DISPLAY").as_deref(),
            var("WAYLAND_SOCKET").as_deref(),
            var("DISPLAY").as_deref(),
        )
    }
}

/// Why push-to-talk works only while the window has focus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WindowOnly {
    /// The user turned "outside this window" off.
    TurnedOff,
    /// The key is one people type with (Space, letters, digits, punctuation, arrows ...).
    TypingKey,
    /// Wayland gives no application a global key grab; its shortcut portal is not used yet.
    Wayland,
    /// No X11 display to grab the key on.
    NoDisplay,
    /// The grab failed, typically because another application holds the same key.
    GrabFailed(String),
}

/// Where push-to-talk works right now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PttScope {
    /// Push-to-talk is off.
    #[default]
    Off,
    /// The grab was asked for and has not been answered yet.
    Pending,
    /// The key works whichever window has focus.
    Everywhere,
    /// The key works only while our window has focus.
    WindowOnly(WindowOnly),
}

impl PttScope {
    /// One line for the controls, or `None` when there is nothing to say.
    pub fn hint(&self, key: &str) -> Option<String> {
        Some(match self {
            Self::Off | Self::Pending => return None,
            Self::Everywhere => format!("{key} works in every window"),
            Self::WindowOnly(why) => match why {
                WindowOnly::TurnedOff => format!("{key} works only in this window"),
                WindowOnly::TypingKey => format!(
                    "{key} works only in this window: it is a typing key. Pick a function key \
                     (F1-F24) or Insert to talk from other windows"
                ),
                WindowOnly::Wayland => format!(
                    "{key} works only in this window: Wayland gives apps no global keys yet"
                ),
                WindowOnly::NoDisplay => format!("{key} works only in this window: no X display"),
                WindowOnly::GrabFailed(e) => {
                    format!("{key} works only in this window: {e}")
                }
            },
        })
    }
}

/// The key to grab for push-to-talk outside the window, or why there is none (before any grab
/// is tried). `key` is an egui key name as stored in the settings ("F9", "Space").
pub fn global_key(
    enabled: bool,
    outside_window: bool,
    key: &str,
    display: DisplayServer,
) -> Result<Code, PttScope> {
    if !enabled {
        return Err(PttScope::Off);
    }
    if !outside_window {
        return Err(PttScope::WindowOnly(WindowOnly::TurnedOff));
    }
    let Some(code) = egui::Key::from_name(key).and_then(grabbable_code) else {
        return Err(PttScope::WindowOnly(WindowOnly::TypingKey));
    };
    match display {
        DisplayServer::X11 => Ok(code),
        DisplayServer::Wayland => Err(PttScope::WindowOnly(WindowOnly::Wayland)),
        DisplayServer::Unknown => Err(PttScope::WindowOnly(WindowOnly::NoDisplay)),
    }
}

/// The hardware key code of a key that may be grabbed for the whole desktop: the function keys
/// F1-F24 (the X server knows no more) and Insert. `None` for every key people type or
/// navigate with.
pub fn grabbable_code(key: egui::Key) -> Option<Code> {
    use egui::Key as K;
    Some(match key {
        K::F1 => Code::F1,
        K::F2 => Code::F2,
        K::F3 => Code::F3,
        K::F4 => Code::F4,
        K::F5 => Code::F5,
        K::F6 => Code::F6,
        K::F7 => Code::F7,
        K::F8 => Code::F8,
        K::F9 => Code::F9,
        K::F10 => Code::F10,
        K::F11 => Code::F11,
        K::F12 => Code::F12,
        K::F13 => Code::F13,
        K::F14 => Code::F14,
        K::F15 => Code::F15,
        K::F16 => Code::F16,
        K::F17 => Code::F17,
        K::F18 => Code::F18,
        K::F19 => Code::F19,
        K::F20 => Code::F20,
        K::F21 => Code::F21,
        K::F22 => Code::F22,
        K::F23 => Code::F23,
        K::F24 => Code::F24,
        K::Insert => Code::Insert,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wayland_wins_over_x11_as_in_winit_and_empty_values_do_not_count() {
        assert_eq!(
            DisplayServer::from_env_values(Some("wayland-0"), None, Some(":0")),
            DisplayServer::Wayland
        );
        assert_eq!(
            DisplayServer::from_env_values(Some(""), None, Some(":0")),
            DisplayServer::X11
        );
        assert_eq!(
            DisplayServer::from_env_values(None, Some("3"), None),
            DisplayServer::Wayland
        );
        assert_eq!(
            DisplayServer::from_env_values(None, None, Some("")),
            DisplayServer::Unknown
        );
    }

    #[test]
    fn only_function_keys_and_insert_are_grabbed_on_x11() {
        let x11 = DisplayServer::X11;
        assert_eq!(global_key(true, true, "F9", x11), Ok(Code::F9));
        assert_eq!(global_key(true, true, "F24", x11), Ok(Code::F24));
        assert_eq!(global_key(true, true, "Insert", x11), Ok(Code::Insert));
        for typing in [
            "Space", "T", "Num1", "Comma", "ArrowUp", "Enter", "F25", "nonsense",
        ] {
            assert_eq!(
                global_key(true, true, typing, x11),
                Err(PttScope::WindowOnly(WindowOnly::TypingKey)),
                "{typing}"
            );
        }
    }

    #[test]
    fn nothing_is_grabbed_when_off_turned_off_on_wayland_or_without_a_display() {
        assert_eq!(
            global_key(false, true, "F9", DisplayServer::X11),
            Err(PttScope::Off)
        );
        assert_eq!(
            global_key(true, false, "F9", DisplayServer::X11),
            Err(PttScope::WindowOnly(WindowOnly::TurnedOff))
        );
        assert_eq!(
            global_key(true, true, "F9", DisplayServer::Wayland),
            Err(PttScope::WindowOnly(WindowOnly::Wayland))
        );
        assert_eq!(
            global_key(true, true, "F9", DisplayServer::Unknown),
            Err(PttScope::WindowOnly(WindowOnly::NoDisplay))
        );
    }

    #[test]
    fn the_hint_names_the_key_and_the_way_out() {
        assert_eq!(PttScope::Off.hint("F9"), None);
        assert_eq!(
            PttScope::Everywhere.hint("F9").as_deref(),
            Some("F9 works in every window")
        );
        let typing = PttScope::WindowOnly(WindowOnly::TypingKey)
            .hint("Space")
            .unwrap();
        assert!(
            typing.contains("Space") && typing.contains("F1-F24"),
            "{typing}"
        );
    }
}
