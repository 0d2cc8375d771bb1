//! ECS components of the server world. They mirror [`super::state::ServerState`] so tools (and a
//! host-mode UI) can query channels and sessions like any other entities.

use std::net::SocketAddr;

use bevy::prelude::*;

use super::state::SessionId;

/// Marks a configured channel entity.
#[derive(Component, Debug)]
pub struct Channel;

#[derive(Component, Debug, Clone)]
pub struct ChannelName(pub String);

/// Present (with the argon2 PHC string) on password-protected channels only.
#[derive(Component, Debug, Clone)]
pub struct PasswordHash(pub String);

#[derive(Component, Debug, Clone, Copy)]
pub struct MaxMembers(pub u32);

/// One TCP connection to the server.
#[derive(Component, Debug, Clone, Copy)]
pub struct Session(pub SessionId);

/// Set once the session identified.
#[derive(Component, Debug, Clone)]
pub struct Username(pub String);

/// The channel entity this session is in.
#[derive(Component, Debug, Clone, Copy)]
pub struct InChannel(pub Entity);

/// Where the session's client can be reached over UDP.
#[derive(Component, Debug, Clone, Default)]
pub struct VoiceEndpoints {
    pub local: Vec<SocketAddr>,
    pub public: Option<SocketAddr>,
}
