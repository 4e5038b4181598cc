//! Fault injection for the test suite: `SHARDFLOW_FAULT=<step>:<kill|fail>` makes the process
//! SIGKILL itself, or fail with an error, the first time it reaches that step. Read only by
//! debug builds (the ones the tests run); a release build compiles every point to nothing, so
//! no environment can make a production process kill itself.

#[cfg(debug_assertions)]
use crate::Error;
use crate::Result;

pub const FAULT_ENV: &str = "SHARDFLOW_FAULT";

/// The named steps of a run, in the order a run reaches them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The dispatcher recorded the run and its shards.
    Planned,
    /// Every shard message is published.
    ShardsPublished,
    /// A worker wrote the first batch of a shard and not the rest.
    ShardHalfWritten,
    /// A worker published a shard's result and has not acked the shard yet.
    ResultPublished,
    /// The dispatcher is about to load (all shards in, or the fast path).
    LoadStarted,
    /// The Parquet warehouse built and synced the new version and has not swapped it in.
    Swap,
    /// The warehouse load returned; the state store does not know yet.
    LoadCommitted,
    /// The run's end is recorded in the state store; nothing is reported yet.
    StateCommitted,
    /// Django has the report; the job message is not acked yet.
    ReportSent,
}

pub const STEPS: [Step; 9] = [
    Step::Planned,
    Step::ShardsPublished,
    Step::ShardHalfWritten,
    Step::ResultPublished,
    Step::LoadStarted,
    Step::Swap,
    Step::LoadCommitted,
    Step::StateCommitted,
    Step::ReportSent,
];

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Step::Planned => "planned",
            Step::ShardsPublished => "shards_published",
            Step::ShardHalfWritten => "shard_half_written",
            Step::ResultPublished => "result_published",
            Step::LoadStarted => "load_started",
            Step::Swap => "swap",
            Step::LoadCommitted => "load_committed",
            Step::StateCommitted => "state_committed",
            Step::ReportSent => "report_sent",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// SIGKILL: nothing after this point runs, as when the machine goes away.
    Kill,
    /// An error from this point, as when a dependency refuses.
    Fail,
}

/// `<step>:<kill|fail>`.
pub fn parse(spec: &str) -> std::result::Result<(Step, Action), String> {
    let (step, action) = spec
        .split_once(':')
        .ok_or_else(|| format!("{FAULT_ENV}={spec:?}: expected <step>:<kill|fail>"))?;
    let step = STEPS
        .into_iter()
        .find(|s| s.name() == step)
        .ok_or_else(|| {
            let names: Vec<&str> = STEPS.iter().map(|s| s.name()).collect();
            format!(
                "{FAULT_ENV}: no step {step:?} (steps: {})",
                names.join(", ")
            )
        })?;
    let action = match action {
        "kill" => Action::Kill,
        "fail" => Action::Fail,
        other => return Err(format!("{FAULT_ENV}: no action {other:?} (kill or fail)")),
    };
    Ok((step, action))
}

/// Reached `step`: the injected fault happens here if the environment asks for it.
#[cfg(debug_assertions)]
pub fn point(step: Step) -> Result<()> {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicBool, Ordering};
    static FAULT: OnceLock<Option<(Step, Action)>> = OnceLock::new();
    static FIRED: AtomicBool = AtomicBool::new(false);
    let fault = FAULT.get_or_init(|| {
        let spec = std::env::var(FAULT_ENV).ok()?;
        match parse(&spec) {
            Ok(fault) => Some(fault),
            Err(e) => {
                // A test that sets a wrong fault must not pass as if no fault happened.
                eprintln!("{e}");
                std::process::abort();
            }
        }
    });
    match fault {
        Some((at, action)) if *at == step && !FIRED.swap(true, Ordering::SeqCst) => {
            eprintln!(
                "injected fault: {} at {}",
                action_name(*action),
                step.name()
            );
            match action {
                Action::Kill => {
                    // SAFETY: kill(2) on our own pid; SIGKILL cannot be caught, so nothing
                    // after this line runs.
                    unsafe {
                        libc::kill(libc::getpid(), libc::SIGKILL);
                    }
                    std::process::abort();
                }
                Action::Fail => Err(Error::Other(format!("injected fault at {}", step.name()))),
            }
        }
        _ => Ok(()),
    }
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn point(_step: Step) -> Result<()> {
    Ok(())
}

#[cfg(debug_assertions)]
fn action_name(action: Action) -> &'static str {
    match action {
        Action::Kill => "kill",
        Action::Fail => "fail",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_named_by_step_and_action() {
        for step in STEPS {
            assert_eq!(
                parse(&format!("{}:kill", step.name())),
                Ok((step, Action::Kill))
            );
        }
        assert_eq!(parse("swap:fail"), Ok((Step::Swap, Action::Fail)));
        assert!(
            parse("swap")
                .unwrap_err()
                .contains("expected <step>:<kill|fail>")
        );
        let err = parse("swapped:kill").unwrap_err();
        assert!(
            err.contains("no step \"swapped\"") && err.contains("load_committed"),
            "{err}"
        );
        assert!(
            parse("swap:explode")
                .unwrap_err()
                .contains("no action \"explode\"")
        );
    }
}
