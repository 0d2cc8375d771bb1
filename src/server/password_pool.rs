//! Worker threads that check channel passwords, so argon2 (slow on purpose) never stalls the
//! server's tick.
//!
//! A shell: [`ServerState`](super::state::ServerState) decides when a password needs checking
//! ([`Output::VerifyPassword`](super::state::Output::VerifyPassword)) and what a result means
//! ([`ServerState::handle_password_checked`](super::state::ServerState::handle_password_checked));
//! this only runs the hash on other threads and hands results back. The queue to the workers
//! is bounded by the rules, not here: [`ServerState`](super::state::ServerState) hands out at
//! most `PasswordRules::max_checks` checks before their results come back (see
//! [`super::password_limits`]), so at most that many jobs ever wait.

use crossbeam_channel::{Receiver, Sender};

use super::state::SessionId;
use crate::config::verify_password;
use crate::protocol::Password;

/// Threads checking passwords. Two keep a burst of joins to a protected channel moving without
/// taking the machine from the tick.
pub const PASSWORD_WORKERS: usize = 2;

/// One password to check against a channel's hash, for the join identified by `ticket`.
pub struct PasswordJob {
    pub session: SessionId,
    pub ticket: u64,
    pub hash: String,
    pub password: Password,
}

/// The outcome of a [`PasswordJob`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasswordResult {
    pub session: SessionId,
    pub ticket: u64,
    pub ok: bool,
}

/// The worker threads and the channels to them. Dropping the pool ends the workers once their
/// current check is done.
pub struct PasswordPool {
    jobs: Sender<PasswordJob>,
    results: Receiver<PasswordResult>,
}

impl PasswordPool {
    pub fn spawn(workers: usize) -> Self {
        let (jobs, jobs_rx) = crossbeam_channel::unbounded::<PasswordJob>();
        let (results_tx, results) = crossbeam_channel::unbounded::<PasswordResult>();
        for i in 0..workers.max(1) {
            let jobs_rx = jobs_rx.clone();
            let results_tx = results_tx.clone();
            std::thread::Builder::new()
                .name(format!("password-check-{i}"))
                .spawn(move || {
                    for job in jobs_rx {
                        let result = PasswordResult {
                            session: job.session,
                            ticket: job.ticket,
                            ok: verify_password(&job.hash, job.password.as_str()),
                        };
                        if results_tx.send(result).is_err() {
                            break;
                        }
                    }
                })
                .expect("spawn password worker");
        }
        Self { jobs, results }
    }

    pub fn submit(&self, job: PasswordJob) {
        // Fails only when every worker is gone, i.e. the server is shutting down.
        let _ = self.jobs.send(job);
    }

    /// A finished check, if any.
    pub fn try_result(&self) -> Option<PasswordResult> {
        self.results.try_recv().ok()
    }
}
