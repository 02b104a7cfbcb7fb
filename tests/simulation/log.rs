//! `SIMULATION_LOG=<filter>` (e.g. `allocation_worker=debug`) shows the
//! engine's log of a run, stamped with simulated time since the run began.

use std::cell::Cell;
use std::sync::OnceLock;

use tokio::time::Instant;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;

thread_local! {
    /// When the run on this thread began, in its simulated time.
    static START: Cell<Option<Instant>> = const { Cell::new(None) };
}

struct SimulatedTime;

impl FormatTime for SimulatedTime {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        match START.get() {
            Some(start) if tokio::runtime::Handle::try_current().is_ok() => {
                write!(w, "{:>12.3?}", Instant::now() - start)
            }
            _ => write!(w, "{:>12}", "-"),
        }
    }
}

/// Marks the start of a run (inside its runtime) and, the first time,
/// installs the log if asked for.
pub fn init() {
    START.set(Some(Instant::now()));
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        if let Ok(filter) = std::env::var("SIMULATION_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_timer(SimulatedTime)
                .with_test_writer()
                .try_init();
        }
    });
}
