//! When a client that does not read its socket is dropped.
//!
//! Everything we send a client waits in memory until its socket takes it. A client that stops
//! reading (a frozen machine, or an attacker) would otherwise make the server hold every
//! presence update of a busy lobby for it. So each connection may have at most
//! [`MAX_QUEUED_OUTPUT`] bytes waiting; a message that does not fit closes the connection with
//! [`CloseReason::TooSlow`] instead of growing the queue. A client that does read never gets
//! near the limit: a full overview of 1,000 members is well under it.
//!
//! Pure: the shell says how much is queued and how big the next message is. The TLS layer
//! (rustls) enforces the same limit on its own buffer, configured with the same constant.

use super::close_reason::CloseReason;

/// A client that does not read its socket gets this much queued before it is dropped.
pub const MAX_QUEUED_OUTPUT: usize = 1024 * 1024;

/// May `frame` more bytes wait for a client that already has `queued` bytes waiting?
/// `Err(TooSlow)` means the client must be closed: it is not reading.
pub fn admit_output(queued: usize, frame: usize) -> Result<(), CloseReason> {
    match queued.checked_add(frame) {
        Some(total) if total <= MAX_QUEUED_OUTPUT => Ok(()),
        _ => Err(CloseReason::TooSlow),
    }
}

/// A client with more than this much of our output not yet taken by its socket gets no more
/// tunnelled voice until it catches up: about half a second of a relay budget's worth.
pub const MAX_TUNNEL_BACKLOG: usize = 16 * 1024;

/// May a tunnelled datagram (relayed voice for a client whose UDP is blocked) be queued for
/// a client with `unflushed` bytes of earlier output still waiting? Voice that waits behind a
/// backlog arrives too late to be played, and would delay the control messages queued after
/// it and push the client towards the [`MAX_QUEUED_OUTPUT`] cut-off; so it is dropped
/// instead (the receiver conceals it, as any lost packet).
pub fn admit_tunnelled(unflushed: usize) -> bool {
    unflushed <= MAX_TUNNEL_BACKLOG
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnelled_voice_waits_only_behind_a_short_backlog() {
        assert!(admit_tunnelled(0));
        assert!(admit_tunnelled(MAX_TUNNEL_BACKLOG));
        assert!(!admit_tunnelled(MAX_TUNNEL_BACKLOG + 1));
        const { assert!(MAX_TUNNEL_BACKLOG < MAX_QUEUED_OUTPUT) };
    }

    #[test]
    fn output_up_to_the_limit_waits() {
        assert_eq!(admit_output(0, 100), Ok(()));
        assert_eq!(admit_output(MAX_QUEUED_OUTPUT - 100, 100), Ok(()));
    }

    #[test]
    fn a_client_over_the_limit_is_too_slow() {
        assert_eq!(
            admit_output(MAX_QUEUED_OUTPUT - 99, 100),
            Err(CloseReason::TooSlow)
        );
        assert_eq!(
            admit_output(0, MAX_QUEUED_OUTPUT + 1),
            Err(CloseReason::TooSlow),
            "one message bigger than the whole queue"
        );
    }

    #[test]
    fn huge_sizes_do_not_overflow() {
        assert_eq!(admit_output(usize::MAX, 1), Err(CloseReason::TooSlow));
    }
}
