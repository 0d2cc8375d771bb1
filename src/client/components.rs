//! ECS components of the client world: the server's overview mirrored as entities, plus the
//! per-user voice state the UI reads. The UI never touches sockets; it reads these.

use bevy::prelude::*;

use crate::protocol::UserId;
use crate::voice::PeerState;

/// A channel on the server.
#[derive(Component, Debug, Clone)]
pub struct Channel {
    pub name: String,
    pub has_password: bool,
    pub max_members: u32,
    /// Position in the server's list, for stable ordering.
    pub order: usize,
}

/// A user in some channel.
#[derive(Component, Debug, Clone)]
pub struct User {
    pub id: UserId,
    pub name: String,
}

/// The channel entity this user is in.
#[derive(Component, Debug, Clone, Copy)]
pub struct MemberOf(pub Entity);

/// Marks the local user's own entity.
#[derive(Component, Debug, Clone, Copy)]
pub struct IsSelf;

/// Voice activity (VAD) of this user, as last reported.
#[derive(Component, Debug, Clone, Copy, Default)]
pub struct Speaking(pub bool);

/// Level of this user's voice, 0..1 (meter scale).
#[derive(Component, Debug, Clone, Copy, Default)]
pub struct VoiceLevel(pub f32);

/// Locally muted (we do not play this user).
#[derive(Component, Debug, Clone, Copy, Default)]
pub struct Muted(pub bool);

/// Playback gain for this user, 0..2.
#[derive(Component, Debug, Clone, Copy)]
pub struct Volume(pub f32);

impl Default for Volume {
    fn default() -> Self {
        Self(1.0)
    }
}

/// The voice link to this user as the voice plane last reported it, with its quality figures,
/// for the overview and the details view. (The link's state machine is `voice::net`'s
/// `PeerLink`; this is only its mirror on the user entity.)
#[derive(Component, Debug, Clone)]
pub struct LinkStatus {
    pub state: PeerState,
    pub rtt_ms: Option<f32>,
    pub loss_pct: f32,
    /// What this member last reported losing of our voice, in per cent.
    pub reported_loss_pct: Option<f32>,
    pub jitter_ms: f32,
    pub buffer_ms: f32,
    pub fingerprint: Option<String>,
}

impl Default for LinkStatus {
    /// A member we just heard of: punching has not answered yet.
    fn default() -> Self {
        Self {
            state: PeerState::Punching,
            rtt_ms: None,
            loss_pct: 0.0,
            reported_loss_pct: None,
            jitter_ms: 0.0,
            buffer_ms: 0.0,
            fingerprint: None,
        }
    }
}
