//! Push-to-talk while another window has focus: a thread of its own holds the X11 key grab
//! (`global-hotkey`, Tauri's crate) and sends each press and release straight to the voice
//! thread, so talking never waits for a Bevy frame (a hidden or minimised window may render
//! slowly or not at all). The UI only says which key it wants ([`GlobalPtt::want`]) and shows
//! the answer ([`GlobalPtt::poll_scope`]); what may be grabbed is decided in `ptt_scope`.
//!
//! Registering a grab waits for the library's X thread (up to one of its 50 ms polls), which is
//! why this never runs on the UI thread.

use crossbeam_channel::{select, Receiver, Sender};
use global_hotkey::hotkey::{Code, HotKey};
use global_hotkey::{GlobalHotKeyEvent, GlobalHotKeyManager, HotKeyState};

use super::ptt_scope::{PttScope, WindowOnly};

/// What the grab thread answers after each change of the wanted key.
#[derive(Debug, Clone, PartialEq, Eq)]
enum GrabAnswer {
    Grabbed(Code),
    Failed(Code, String),
}

/// The UI's handle on the grab thread. Dropping it releases the grab and ends the thread.
pub struct GlobalPtt {
    want: Sender<Option<Code>>,
    answers: Receiver<GrabAnswer>,
    /// The key last asked for (`None`: no grab).
    wanted: Option<Code>,
}

impl GlobalPtt {
    /// Starts the thread; `on_key(true)` / `on_key(false)` is called from it at each press and
    /// release of the grabbed key (never twice the same in a row).
    pub fn spawn(on_key: impl Fn(bool) + Send + 'static) -> std::io::Result<Self> {
        let (want, want_rx) = crossbeam_channel::unbounded();
        let (answer_tx, answers) = crossbeam_channel::unbounded();
        std::thread::Builder::new()
            .name("global-ptt".into())
            .spawn(move || grab_loop(want_rx, answer_tx, on_key))?;
        Ok(Self {
            want,
            answers,
            wanted: None,
        })
    }

    /// Grab this key (releasing any other), or none. Does nothing when it is already the one;
    /// true when a change was asked for (its answer comes through [`Self::poll_scope`]).
    pub fn want(&mut self, code: Option<Code>) -> bool {
        if code == self.wanted {
            return false;
        }
        self.wanted = code;
        let _ = self.want.send(code);
        true
    }

    /// The scope after the newest answer about the key wanted now, if one came since the last
    /// call (answers about keys no longer wanted are skipped).
    pub fn poll_scope(&mut self) -> Option<PttScope> {
        let mut scope = None;
        for answer in self.answers.try_iter() {
            match answer {
                GrabAnswer::Grabbed(code) if Some(code) == self.wanted => {
                    scope = Some(PttScope::Everywhere)
                }
                GrabAnswer::Failed(code, why) if Some(code) == self.wanted => {
                    scope = Some(PttScope::WindowOnly(WindowOnly::GrabFailed(why)))
                }
                _ => {}
            }
        }
        scope
    }
}

/// The grab thread: changes the grab when asked, and turns the library's events for our key
/// into `on_key` calls. Ends when the handle is dropped.
fn grab_loop(want: Receiver<Option<Code>>, answers: Sender<GrabAnswer>, on_key: impl Fn(bool)) {
    let events = GlobalHotKeyEvent::receiver();
    // Made at the first grab: it opens its own X connection and thread.
    let mut manager: Option<GlobalHotKeyManager> = None;
    let mut grabbed: Option<HotKey> = None;
    let mut down = false;
    loop {
        select! {
            recv(want) -> msg => {
                let Ok(code) = msg else { break };
                if let (Some(m), Some(old)) = (&manager, grabbed.take()) {
                    let _ = m.unregister(old);
                }
                if down {
                    // The key that was held is no longer ours: its release would go unseen.
                    down = false;
                    on_key(false);
                }
                let Some(code) = code else { continue };
                if manager.is_none() {
                    match GlobalHotKeyManager::new() {
                        Ok(m) => manager = Some(m),
                        Err(e) => {
                            let _ = answers.send(GrabAnswer::Failed(code, e.to_string()));
                            continue;
                        }
                    }
                }
                let Some(m) = &manager else { continue };
                let hotkey = HotKey::new(None, code);
                let answer = match m.register(hotkey) {
                    Ok(()) => {
                        grabbed = Some(hotkey);
                        GrabAnswer::Grabbed(code)
                    }
                    Err(e) => GrabAnswer::Failed(code, grab_error(&e)),
                };
                let _ = answers.send(answer);
            }
            recv(events) -> ev => {
                let Ok(ev) = ev else { break };
                if grabbed.is_some_and(|h| h.id() == ev.id()) {
                    let pressed = ev.state() == HotKeyState::Pressed;
                    if pressed != down {
                        down = pressed;
                        on_key(pressed);
                    }
                }
            }
        }
    }
    if down {
        on_key(false);
    }
    if let (Some(m), Some(old)) = (&manager, grabbed) {
        let _ = m.unregister(old);
    }
}

/// A short reason for the controls.
fn grab_error(e: &global_hotkey::Error) -> String {
    match e {
        global_hotkey::Error::AlreadyRegistered(_) => {
            "another application holds this key".to_owned()
        }
        other => other.to_string(),
    }
}
