//! Process signals as two steps: the first SIGTERM/SIGINT asks to drain, the second to stop now.

use tokio::signal::unix::{Signal, SignalKind, signal};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// First signal: stop taking new work, let open work finish (bounded by a deadline).
    Drain,
    /// Second signal: stop at once.
    Stop,
}

pub struct Signals {
    term: Signal,
    int: Signal,
    seen: u32,
}

impl Signals {
    /// Installs the handlers; call before anything else can race a signal.
    pub fn install() -> std::io::Result<Self> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            seen: 0,
        })
    }

    /// Waits for the next signal.
    pub async fn next(&mut self) -> Step {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        self.seen += 1;
        if self.seen == 1 {
            Step::Drain
        } else {
            Step::Stop
        }
    }
}
