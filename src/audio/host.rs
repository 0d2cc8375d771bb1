//! Which sound system the real devices go through.
//!
//! On Linux cpal offers its native PulseAudio client (which PipeWire's `pipewire-pulse` also
//! serves) and ALSA. ALSA's `default` device on a desktop is usually the pulse plugin, which
//! turns the sound server's ordinary timing hiccups into I/O errors; our device thread then
//! has to restart the stream (the "restarted after repeated errors" a user heard as a skip).
//! Talking to the sound server natively avoids that layer, so [`AudioHost::Auto`] prefers it
//! whenever a server socket is there and falls back to ALSA otherwise.

use std::fmt;
use std::str::FromStr;

use super::AudioError;

/// The audio host to open devices on: chosen by cpal ([`AudioHost::Auto`]) or by name
/// (`--audio-host`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AudioHost {
    /// PulseAudio (or PipeWire's pulse server) when its socket is there, else ALSA.
    #[default]
    Auto,
    /// One host by its cpal identity.
    Named(cpal::HostId),
}

impl AudioHost {
    /// Opens the host. A named host that is compiled in but not running (no sound server)
    /// is an error naming it, never a silent fallback: the user asked for that one.
    pub fn open(self) -> Result<cpal::Host, AudioError> {
        match self {
            AudioHost::Auto => Ok(cpal::default_host()),
            AudioHost::Named(id) => cpal::host_from_id(id)
                .map_err(|e| AudioError::Host(format!("audio host {}: {e}", id.name()))),
        }
    }

    /// Hosts that could be opened now (a sound server's socket is there), by name.
    pub fn available() -> Vec<&'static str> {
        cpal::available_hosts().iter().map(|h| h.name()).collect()
    }

    /// Names `--audio-host` accepts on this build, in cpal's order of preference.
    pub fn names() -> Vec<&'static str> {
        cpal::ALL_HOSTS.iter().map(|h| h.name()).collect()
    }
}

impl fmt::Display for AudioHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AudioHost::Auto => f.write_str("auto"),
            AudioHost::Named(id) => f.write_str(id.name()),
        }
    }
}

/// A name `--audio-host` does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown audio host \"{given}\"; this build knows: auto, {}", known.join(", "))]
pub struct UnknownAudioHost {
    pub given: String,
    pub known: Vec<&'static str>,
}

impl FromStr for AudioHost {
    type Err = UnknownAudioHost;

    /// `auto` or a host name as `p2p-voice devices` prints it, in any case
    /// (`pulseaudio`, `ALSA`, ...).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("auto") {
            return Ok(AudioHost::Auto);
        }
        cpal::ALL_HOSTS
            .iter()
            .find(|h| h.name().eq_ignore_ascii_case(s))
            .map(|h| AudioHost::Named(*h))
            .ok_or_else(|| UnknownAudioHost {
                given: s.to_string(),
                known: AudioHost::names(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_in_any_case_and_print_back() {
        assert_eq!("auto".parse::<AudioHost>(), Ok(AudioHost::Auto));
        assert_eq!("AUTO".parse::<AudioHost>(), Ok(AudioHost::Auto));
        for name in AudioHost::names() {
            let host: AudioHost = name.to_lowercase().parse().expect("a listed name parses");
            assert_eq!(host.to_string(), name);
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn linux_builds_have_the_native_sound_server_and_alsa() {
        let names = AudioHost::names();
        assert!(names.contains(&"ALSA"), "{names:?}");
        assert!(
            names.iter().any(|n| n.eq_ignore_ascii_case("pulseaudio")),
            "cpal's pulseaudio feature is off: {names:?}"
        );
    }

    #[test]
    fn an_unknown_name_lists_the_known_ones() {
        let err = "oss".parse::<AudioHost>().unwrap_err();
        let text = err.to_string();
        assert!(text.contains("\"oss\""), "{text}");
        assert!(text.contains("auto"), "{text}");
        assert!(
            text.contains("ALSA") || !cfg!(target_os = "linux"),
            "{text}"
        );
    }
}
