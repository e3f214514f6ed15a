//! The step timeout: a [`StepRunner`] that gives each call of the one it wraps at most
//! `KILN_BUILD_STEP_TIMEOUT_SEC`. A call over it is dropped, which removes its build
//! sandbox (the runner's contract for a dropped call), and fails; the wrapper remembers
//! which call it was so that the build's failure can name the step and the setting.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_template::build::{ReadyCheck, RunError, RunRequest, StepRunner};

/// What ran over its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overrun {
    /// A RUN, USER or WORKDIR step.
    Step,
    /// The finalize phase's start and ready commands.
    ReadyCheck,
}

/// One build's view of the server's runner, with the step timeout.
pub struct TimedRunner {
    inner: Arc<dyn StepRunner>,
    limit: Duration,
    overrun: Mutex<Option<Overrun>>,
}

impl TimedRunner {
    pub fn new(inner: Arc<dyn StepRunner>, limit: Duration) -> Self {
        TimedRunner {
            inner,
            limit,
            overrun: Mutex::new(None),
        }
    }

    /// The call that ran over the limit, if one did.
    pub fn overrun(&self) -> Option<Overrun> {
        *self.overrun.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn over(&self, what: Overrun) -> RunError {
        *self.overrun.lock().unwrap_or_else(|e| e.into_inner()) = Some(what);
        RunError::Failed(format!(
            "did not finish within {} s (KILN_BUILD_STEP_TIMEOUT_SEC)",
            self.limit.as_secs()
        ))
    }
}

#[async_trait::async_trait]
impl StepRunner for TimedRunner {
    async fn run(
        &self,
        req: RunRequest<'_>,
        on_line: &mut (dyn FnMut(String) + Send),
    ) -> Result<(), RunError> {
        match tokio::time::timeout(self.limit, self.inner.run(req, on_line)).await {
            Ok(r) => r,
            Err(_) => Err(self.over(Overrun::Step)),
        }
    }

    async fn check_ready(
        &self,
        check: ReadyCheck<'_>,
        on_line: &mut (dyn FnMut(String) + Send),
    ) -> Result<(), RunError> {
        match tokio::time::timeout(self.limit, self.inner.check_ready(check, on_line)).await {
            Ok(r) => r,
            Err(_) => Err(self.over(Overrun::ReadyCheck)),
        }
    }
}
