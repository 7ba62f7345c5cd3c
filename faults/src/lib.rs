//! Named fault points, shared by the agent's change tracking and the target's replica store, so
//! tests can crash a daemon or fail an operation exactly between two steps of a write.
//!
//! A fault point is a call `failpoint("cbt.al.sync")?` placed just before the operation it
//! names. It does nothing unless the crate is built with the `failpoints` feature (the daemons'
//! own `failpoints` features enable it) and the environment variable [`ENV`] arms that name:
//!
//! ```text
//! BLOCKFERRY_FAILPOINTS="name=action[@n],..."
//! ```
//!
//! makes the `n`-th hit (default the first, counted from process start) of point `name` either
//! `exit` the process at once with status [`EXIT_STATUS`] after printing `failpoint NAME: exit`
//! to stderr (a crash between two steps), or fail with an I/O error `failpoint NAME` (any other
//! action, normally `error`). Each point fires at most once. Malformed entries (no `=`, or an
//! `@n` that is not a number) are ignored. The variable is read at the first hit of any point.
//!
//! The points themselves are listed where they are placed: `blockferry_agent::cbt::store` and
//! `blockferry_target::store::storage`.
#![forbid(unsafe_code)]

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

/// The environment variable that arms fault points (read only with the `failpoints` feature).
pub const ENV: &str = "BLOCKFERRY_FAILPOINTS";
/// The exit status of a process stopped by an `exit` fault point.
pub const EXIT_STATUS: i32 = 86;

/// What an armed point does when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Exit the process at once (`exit`).
    Exit,
    /// Fail the operation with an I/O error (`error`, or any action that is not `exit`).
    Error,
}

/// One entry of a spec: point `name` fires with `action` at its `nth` hit (1 = the first; 0
/// never fires).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Armed {
    pub name: String,
    pub action: Action,
    pub nth: u64,
}

/// Parses a spec (`name=action[@n],...`, see the crate docs), skipping malformed entries.
pub fn parse(spec: &str) -> Vec<Armed> {
    spec.split(',')
        .filter_map(|p| {
            let (name, rest) = p.split_once('=')?;
            let (action, nth) = match rest.split_once('@') {
                Some((a, k)) => (a, k.parse().ok()?),
                None => (rest, 1),
            };
            let action = if action.trim() == "exit" { Action::Exit } else { Action::Error };
            Some(Armed { name: name.trim().to_string(), action, nth })
        })
        .collect()
}

/// The armed points of one spec with their hit counters.
#[derive(Debug, Default)]
pub struct FaultPoints {
    points: Vec<(Armed, AtomicU64)>,
}

impl FaultPoints {
    /// The points `spec` arms, none hit yet.
    pub fn new(spec: &str) -> FaultPoints {
        FaultPoints { points: parse(spec).into_iter().map(|a| (a, AtomicU64::new(0))).collect() }
    }

    /// Counts a hit of point `name` and says what to do if an entry fires now. Entries are
    /// checked in spec order and the first that fires ends the hit (later entries for the same
    /// name do not count it).
    pub fn hit(&self, name: &str) -> Option<Action> {
        for (armed, hits) in &self.points {
            if armed.name == name && hits.fetch_add(1, Ordering::SeqCst) + 1 == armed.nth {
                return Some(armed.action);
            }
        }
        None
    }
}

/// A named fault point: does nothing without the `failpoints` feature; with it, fires as
/// [`ENV`] says (see the crate docs): exits the process with [`EXIT_STATUS`], or returns an
/// error `failpoint NAME`.
pub fn failpoint(name: &str) -> io::Result<()> {
    #[cfg(feature = "failpoints")]
    {
        use std::sync::OnceLock;
        static POINTS: OnceLock<FaultPoints> = OnceLock::new();
        let points =
            POINTS.get_or_init(|| FaultPoints::new(&std::env::var(ENV).unwrap_or_default()));
        match points.hit(name) {
            Some(Action::Exit) => {
                eprintln!("failpoint {name}: exit");
                std::process::exit(EXIT_STATUS);
            }
            Some(Action::Error) => return Err(io::Error::other(format!("failpoint {name}"))),
            None => {}
        }
    }
    let _ = name;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn armed(name: &str, action: Action, nth: u64) -> Armed {
        Armed { name: name.to_string(), action, nth }
    }

    #[test]
    fn parses_names_actions_and_counts() {
        assert_eq!(
            parse("cbt.al.sync=exit,target.meta.write=error@3"),
            vec![
                armed("cbt.al.sync", Action::Exit, 1),
                armed("target.meta.write", Action::Error, 3)
            ]
        );
        // Names and actions are trimmed; every action but `exit` is an error.
        assert_eq!(
            parse(" a = exit , b=boom@2,c=@1"),
            vec![
                armed("a", Action::Exit, 1),
                armed("b", Action::Error, 2),
                armed("c", Action::Error, 1)
            ]
        );
    }

    #[test]
    fn skips_malformed_entries() {
        assert_eq!(parse(""), vec![]);
        assert_eq!(parse(",,"), vec![]);
        // No `=`, a count that is not a number (or is padded), a negative count.
        assert_eq!(
            parse("a,b=exit@x,c=exit@ 2,d=exit@-1,e=error@2"),
            vec![armed("e", Action::Error, 2)]
        );
    }

    #[test]
    fn fires_once_at_the_nth_hit() {
        let points = FaultPoints::new("a=error@2,b=exit");
        assert_eq!(points.hit("a"), None);
        assert_eq!(points.hit("b"), Some(Action::Exit));
        assert_eq!(points.hit("a"), Some(Action::Error));
        for _ in 0..3 {
            assert_eq!(points.hit("a"), None);
            assert_eq!(points.hit("b"), None);
            assert_eq!(points.hit("c"), None);
        }
        // @0 never fires.
        let never = FaultPoints::new("a=exit@0");
        assert!((0..5).all(|_| never.hit("a").is_none()));
    }

    #[test]
    fn the_first_entry_that_fires_ends_the_hit() {
        // The first hit fires entry 1 and is not counted by entry 2, so entry 2's second hit is
        // the point's third.
        let points = FaultPoints::new("a=error@1,a=exit@2");
        assert_eq!(points.hit("a"), Some(Action::Error));
        assert_eq!(points.hit("a"), None);
        assert_eq!(points.hit("a"), Some(Action::Exit));
    }

    #[test]
    fn failpoint_without_spec_is_a_no_op() {
        // The tests never set the variable: no point is armed, with or without the feature.
        if std::env::var_os(ENV).is_none() {
            for _ in 0..3 {
                failpoint("cbt.al.write").unwrap();
            }
        }
    }
}
