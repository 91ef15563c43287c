//! Connecting to snapd: a Unix socket path, or an `http://host:port` address (feature `client`).

use crate::v1::snapd_client::SnapdClient;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// The socket of a daemon started with the default data directory.
pub const DEFAULT_SOCKET: &str = "/var/lib/snapvm/snapd.sock";

/// How to reach a daemon over TLS (an `https://` target; feature `tls`): the CA that signed the
/// daemon's certificate, and this client's certificate and key (PEM files).
#[derive(Debug, Clone, Default)]
pub struct Tls {
    /// The CA the daemon's certificate must chain to.
    pub ca: Option<std::path::PathBuf>,
    /// This client's certificate chain.
    pub cert: Option<std::path::PathBuf>,
    /// Its private key.
    pub key: Option<std::path::PathBuf>,
}

/// A channel to `target`: a Unix socket path, or an `http://` address.
///
/// # Errors
/// The connection error, naming the target.
pub async fn channel(target: &str) -> Result<Channel, String> {
    channel_with(target, &Tls::default()).await
}

/// A channel to `target`: a Unix socket path, an `http://` address, or an `https://` one with
/// `tls` (feature `tls`).
///
/// # Errors
/// The connection error, naming the target, or a TLS file that cannot be read.
pub async fn channel_with(target: &str, tls: &Tls) -> Result<Channel, String> {
    if target.starts_with("http://") || target.starts_with("https://") {
        #[allow(unused_mut)]
        let mut endpoint =
            Endpoint::try_from(target.to_string()).map_err(|e| format!("{target}: {e}"))?;
        if target.starts_with("https://") {
            endpoint = with_tls(endpoint, tls)?;
        }
        return endpoint
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

/// Makes ring rustls's process-wide crypto provider, unless one is set already. A program
/// whose dependencies enable more than one provider (ring here, aws-lc-rs for an S3 client, say)
/// has no default one otherwise, and every TLS handshake would fail.
#[cfg(feature = "tls")]
pub fn use_ring_for_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(feature = "tls")]
fn with_tls(endpoint: Endpoint, tls: &Tls) -> Result<Endpoint, String> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    use_ring_for_tls();
    let read =
        |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()));
    let mut config = ClientTlsConfig::new();
    if let Some(ca) = &tls.ca {
        config = config.ca_certificate(Certificate::from_pem(read(ca)?));
    }
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        (None, None) => {}
        _ => return Err("a client certificate needs both its file and its key".into()),
    }
    endpoint
        .tls_config(config)
        .map_err(|e| format!("TLS configuration: {e}"))
}

#[cfg(not(feature = "tls"))]
fn with_tls(_: Endpoint, _: &Tls) -> Result<Endpoint, String> {
    Err("https:// needs snap-api's `tls` feature".into())
}

/// A client of the daemon at `target`.
///
/// # Errors
/// As [`channel`].
pub async fn connect(target: &str) -> Result<SnapdClient<Channel>, String> {
    connect_with(target, &Tls::default()).await
}

/// A client of the daemon at `target`, over TLS for an `https://` target.
///
/// # Errors
/// As [`channel_with`].
pub async fn connect_with(target: &str, tls: &Tls) -> Result<SnapdClient<Channel>, String> {
    Ok(SnapdClient::new(channel_with(target, tls).await?).max_decoding_message_size(64 << 20))
}
