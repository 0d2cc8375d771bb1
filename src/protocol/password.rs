//! A channel password in memory: wiped when dropped, never printed.
//!
//! A password travels from where it is typed (a prompt, a file, the window) through the client
//! session (kept for rejoining after a reconnect), the wire and the server (until argon2 has
//! checked it). Each of those copies is a [`Password`], so none outlives its use in readable
//! form, and none ends up in a log through `Debug`. Copies outside our control are not
//! covered: rustls's own buffers and the text-field state of the window's toolkit.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::{Zeroize, Zeroizing};

/// A password; its bytes are overwritten with zeros when it is dropped.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Password(Zeroizing<String>);

impl Password {
    pub fn new(text: String) -> Self {
        Self(Zeroizing::new(text))
    }

    /// Takes the text out of `field` (a text box's buffer) and wipes what it held.
    pub fn take_from(field: &mut String) -> Self {
        let password = Self::new(field.clone());
        field.zeroize();
        password
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for Password {
    fn from(text: String) -> Self {
        Self::new(text)
    }
}

impl From<&str> for Password {
    fn from(text: &str) -> Self {
        Self::new(text.to_string())
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(<hidden>)")
    }
}

/// On the wire a password is a plain string (the format is unchanged).
impl Serialize for Password {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Password {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_password() {
        let p = Password::from("hunter2");
        assert!(!format!("{p:?}").contains("hunter2"));
        let msg = crate::protocol::ClientMsg::Join {
            channel: "Private".into(),
            password: Some(p),
        };
        assert!(!format!("{msg:?}").contains("hunter2"));
    }

    #[test]
    fn the_wire_format_is_a_plain_string() {
        let cfg = bincode::config::standard();
        let p = Password::from("pw");
        let as_password = bincode::serde::encode_to_vec(&p, cfg).unwrap();
        let as_string = bincode::serde::encode_to_vec("pw", cfg).unwrap();
        assert_eq!(as_password, as_string);
        let (back, _): (Password, usize) =
            bincode::serde::decode_from_slice(&as_string, cfg).unwrap();
        assert_eq!(back.as_str(), "pw");
    }

    #[test]
    fn taking_from_a_text_field_wipes_the_field() {
        let mut field = String::from("secret");
        let p = Password::take_from(&mut field);
        assert_eq!(p.as_str(), "secret");
        assert!(field.is_empty());
    }
}
