//! Waiting for a long operation to end, with a progress bar fed by the daemon's events.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use snap_api::v1 as pb;
use snap_api::v1::snapd_client::SnapdClient;
use tonic::transport::Channel;

use crate::error::CliError;

/// How long one WaitOperation call may block when events are not available.
const POLL: Duration = Duration::from_millis(250);
/// How long without an event before the operation is asked for directly (a safety net: every
/// change of an operation is an event).
const QUIET: Duration = Duration::from_secs(2);

/// A progress bar on stderr (drawn only on a terminal) showing an operation's phase and bytes.
struct Bar(ProgressBar);

impl Bar {
    fn new(visible: bool, what: &str) -> Self {
        let bar = if visible {
            ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        let bar = Self(bar);
        // The style first: the default one would draw a frame of its own.
        bar.style(false);
        bar.0.set_prefix(what.to_string());
        bar.0.enable_steady_tick(Duration::from_millis(100));
        bar
    }

    fn style(&self, bytes: bool) {
        let template = if bytes {
            "{spinner} {prefix}: {msg} [{wide_bar}] {bytes}/{total_bytes} {elapsed}"
        } else {
            "{spinner} {prefix}: {msg} {elapsed}"
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            self.0.set_style(style.progress_chars("=> "));
        }
    }

    fn show(&self, op: &pb::Operation) {
        let p = op.progress.clone().unwrap_or_default();
        self.style(p.bytes_total > 0);
        self.0.set_length(p.bytes_total);
        self.0.set_position(p.bytes_done.min(p.bytes_total));
        let phase = if p.phase.is_empty() {
            state_word(op).to_string()
        } else {
            p.phase
        };
        self.0.set_message(phase);
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

fn state_word(op: &pb::Operation) -> &'static str {
    match op.state() {
        pb::OperationState::Unspecified => "unknown",
        pb::OperationState::Pending => "pending",
        pb::OperationState::Running => "running",
        pb::OperationState::Succeeded => "succeeded",
        pb::OperationState::Failed => "failed",
        pb::OperationState::Cancelled => "cancelled",
    }
}

/// Waits until `op` has ended and returns it as it ended. With `bar`, shows its progress on
/// stderr (on a terminal only). Progress comes from WatchEvents; if the stream is refused or
/// breaks, WaitOperation is polled instead.
pub(crate) async fn until_ended(
    c: &mut SnapdClient<Channel>,
    op: pb::Operation,
    bar: bool,
) -> Result<pb::Operation, CliError> {
    if op.ended_unix_ms != 0 {
        return Ok(op);
    }
    let bar = Bar::new(bar, &crate::show::kind_word(op.kind()));
    // Subscribe first, then read the operation: nothing that happens after the read is missed.
    let mut events = c
        .watch_events(pb::WatchEventsRequest {
            vm_id: op.vm_id.clone(),
            after_sequence: 0,
        })
        .await
        .ok()
        .map(tonic::Response::into_inner);
    let id = op.id.clone();
    let mut op = get(c, &id).await?;
    bar.show(&op);
    while op.ended_unix_ms == 0 {
        let Some(stream) = events.as_mut() else {
            op = c
                .wait_operation(pb::WaitOperationRequest {
                    operation_id: id.clone(),
                    timeout_ms: POLL.as_millis() as u64,
                })
                .await?
                .into_inner();
            bar.show(&op);
            continue;
        };
        match tokio::time::timeout(QUIET, stream.message()).await {
            Ok(Ok(Some(event))) => {
                if let Some(pb::event::Kind::Operation(o)) = event.kind {
                    if o.id == id {
                        op = o;
                        bar.show(&op);
                    }
                }
            }
            // The stream ended or failed (a watcher that fell behind is dropped): poll.
            Ok(Ok(None) | Err(_)) => events = None,
            Err(_) => {
                op = get(c, &id).await?;
                bar.show(&op);
            }
        }
    }
    Ok(op)
}

/// Waits without a progress bar, with WaitOperation only (one call per `timeout`).
pub(crate) async fn quietly(
    c: &mut SnapdClient<Channel>,
    mut op: pb::Operation,
) -> Result<pb::Operation, tonic::Status> {
    while op.ended_unix_ms == 0 {
        op = c
            .wait_operation(pb::WaitOperationRequest {
                operation_id: op.id.clone(),
                timeout_ms: 120_000,
            })
            .await?
            .into_inner();
    }
    Ok(op)
}

async fn get(c: &mut SnapdClient<Channel>, id: &str) -> Result<pb::Operation, CliError> {
    Ok(c.get_operation(pb::GetOperationRequest {
        operation_id: id.to_string(),
    })
    .await?
    .into_inner())
}
