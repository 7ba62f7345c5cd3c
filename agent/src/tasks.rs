//! Small helpers for the agent's servers (NBD, admin) that run one task per connection.

use std::time::Duration;

use tokio::task::JoinSet;

/// Waits up to `limit` for every task of `tasks` to finish, then aborts the rest. Returns how
/// many had to be aborted (0: all finished in time).
pub(crate) async fn drain<T: 'static>(tasks: &mut JoinSet<T>, limit: Duration) -> usize {
    let drained =
        tokio::time::timeout(limit, async { while tasks.join_next().await.is_some() {} }).await;
    let left = tasks.len();
    if drained.is_err() {
        tasks.shutdown().await;
    }
    left
}
