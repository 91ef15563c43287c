//! Connecting to snapd: a Unix socket path, or an `http://host:port` address (feature `client`).

use crate::v1::snapd_client::SnapdClient;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// The socket of a daemon started with the default data directory.
pub const DEFAULT_SOCKET: &str = "/var/lib/snapvm/snapd.sock";

/// A channel to `target`: a Unix socket path, or an `http://` address.
///
/// # Errors
/// The connection error, naming the target.
pub async fn channel(target: &str) -> Result<Channel, String> {
    if target.starts_with("http://") || target.starts_with("https://") {
        return Endpoint::try_from(target.to_string())
            .map_err(|e| format!("{target}: {e}"))?
            .connect()
            .await
            .map_err(|e| format!("connecting to {target}: {e}"));
    }
    let path = target.to_string();
    // The URI is not used: every connection goes to the socket.
    Endpoint::try_from("http://snapd")
        .map_err(|e| e.to_string())?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| format!("connecting to {target} (is snapd running?): {e}"))
}

/// A client of the daemon at `target`.
///
/// # Errors
/// As [`channel`].
pub async fn connect(target: &str) -> Result<SnapdClient<Channel>, String> {
    Ok(SnapdClient::new(channel(target).await?).max_decoding_message_size(64 << 20))
}
