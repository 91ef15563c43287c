//! snapd: serves the snapd v1 gRPC API on a Unix socket in its data directory (mode 0600), or on
//! TCP when asked, with gRPC health and reflection.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use snap_api::v1::snapd_server::SnapdServer;
use snapd::api::Service;
use snapd::auth::{AuthLayer, Listener};
use snapd::daemon::{Config, Daemon};
use snapd::failpoints::FailPoints;
use snapd::images::ImagePolicy;
use snapd::socket_h2::AuthorityFix;
use snapd::store::{Store, StoreOptions};
use tokio::net::UnixListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Certificate, Identity as TlsIdentity, ServerTlsConfig};
use tower::layer::util::{Identity, Stack};

/// Default data directory (not /var/lib/snapd, which belongs to another program of that name).
const DEFAULT_DATA_DIR: &str = "/var/lib/snapvm";

#[derive(Parser, Debug)]
#[command(
    version,
    about = "The VM snapshot daemon: gRPC API on a Unix socket in its data directory"
)]
struct Args {
    /// Where the catalog, layer files and socket live.
    #[arg(long, default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Unix socket to listen on (default: <data-dir>/snapd.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Also (or, with --no-socket, only) listen on this TCP address, e.g. 0.0.0.0:7325: with TLS
    /// and client certificates (--tls-cert, --tls-key, --tls-client-ca).
    #[arg(long)]
    tcp: Option<std::net::SocketAddr>,
    /// The daemon's certificate chain for TCP (PEM).
    #[arg(long, requires_all = ["tcp", "tls_key", "tls_client_ca"])]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The CA whose client certificates may call (PEM). The role is in the certificate's
    /// subject: O=snapd:admin or O=snapd:read-only.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Serve TCP in plain text, with no authentication: anyone who reaches the port controls
    /// every VM. For tests on a closed host only.
    #[arg(long, requires = "tcp", conflicts_with = "tls_cert")]
    insecure_plaintext_tcp: bool,
    /// Do not listen on the Unix socket (needs --tcp).
    #[arg(long, requires = "tcp")]
    no_socket: bool,
    /// Memory layer frame size in KiB (64 to 2048): the lazy restore unit.
    #[arg(long, default_value_t = 256)]
    frame_kib: u32,
    /// How a snapshot copies the VM's memory: write-protect (the VM runs on right after a short
    /// pause while its layer is written; Linux 5.19 or later), copy (pages copied out during the
    /// pause), or auto (write-protect where available).
    #[arg(long, default_value = "auto")]
    snapshot_copy: snapd::snapshot::CopyMode,
    /// With the copy path: a snapshot of at most this many MiB of pages copies them out while
    /// the VM is paused and resumes it before writing and syncing its layer (0: write while
    /// paused).
    #[arg(long, default_value_t = 256)]
    copy_before_resume_mib: u64,
    /// Prepared VMs (KVM VM, memory slots, vCPUs built ahead) kept for each VM shape restored so
    /// far: a restore into one only loads state.
    #[arg(long, default_value_t = 1)]
    warm_pool: usize,
    /// Space in MiB kept back in <data-dir>/reserve and given back when the filesystem is full,
    /// so that the catalog can still be written and snapshots deleted to free space.
    #[arg(long, default_value_t = 64)]
    reserve_mib: u64,
    /// Start even if the catalog does not match the data directory (missing, emptied, or it lost
    /// committed transactions): files it does not name are moved to <data-dir>/lost+found
    /// instead of being deleted.
    #[arg(long)]
    keep_unknown_files: bool,
    /// A directory CreateVm may import raw disk images from (repeatable). Without one, no image
    /// is imported. Only regular files beneath it are read; symlinks out of it are not followed.
    #[arg(long = "image-dir", value_name = "DIR")]
    image_dirs: Vec<PathBuf>,
    /// Largest raw disk image imported, in GiB.
    #[arg(long, default_value_t = snapd::images::DEFAULT_MAX_IMAGE_BYTES >> 30)]
    max_image_gib: u64,
    /// A remote store snapshots can be pushed to and pulled from (repeatable): NAME=URL with
    /// URL `http(s)://HOST[:PORT]/BUCKET[/PREFIX][?region=REGION][&keepalive=BOOL]` (an S3 endpoint, path
    /// style). Credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or from
    /// --remote-credentials; never from the URL.
    #[arg(long = "remote", value_name = "NAME=URL")]
    remotes: Vec<String>,
    /// A file with the remotes' credentials: lines AWS_ACCESS_KEY_ID=... and
    /// AWS_SECRET_ACCESS_KEY=... (instead of the environment). Only its owner may read it
    /// (mode 600 or stricter): snapd refuses it otherwise.
    #[arg(long, value_name = "FILE", requires = "remotes")]
    remote_credentials: Option<PathBuf>,
    /// A remote's chunks that no manifest names are swept only once older than this (and a push
    /// must finish within half of it). Every host pushing to a remote must use the same value,
    /// and their clocks must agree to well within half of it.
    #[arg(long, default_value_t = snapd::remote::DEFAULT_GRACE_MS as u64 / 1000)]
    remote_grace_secs: u64,
    /// The host's cache of chunks fetched for restores straight from a remote (shared by every
    /// VM; least recently used first out), in GiB. It lives in <data-dir>/cache/chunks.
    #[arg(long, default_value_t = 16)]
    remote_cache_gib: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9725 (off by default;
    /// plain HTTP without authentication: bind it where only the scraper reaches).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
}

fn main() {
    // Each long operation is a span (its id, kind, VM and snapshot; its close is logged with its
    // duration) with a child span per phase (logged too with RUST_LOG=snapd=debug).
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("snapd: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), String> {
    // Everything the daemon creates is its own alone: guest memory and disks are in these files.
    // SAFETY: umask only sets the process's file mode creation mask; it cannot fail.
    unsafe { libc::umask(0o077) };
    std::fs::create_dir_all(&args.data_dir)
        .map_err(|e| format!("creating {}: {e}", args.data_dir.display()))?;
    // One daemon per data directory.
    let lock_path = Store::lock_path(&args.data_dir);
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("opening {}: {e}", lock_path.display()))?;
    // SAFETY: flock on a file descriptor we own, for as long as `lock` lives (all of `run`).
    if unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&lock),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    } != 0
    {
        return Err(format!(
            "another snapd is using {} (it holds {})",
            args.data_dir.display(),
            lock_path.display()
        ));
    }
    let failpoints = FailPoints::from_env()?;
    let images = ImagePolicy::new(&args.image_dirs, args.max_image_gib << 30)?;
    let layer_options = snap_mem::layer::LayerOptions {
        frame_size: args.frame_kib << 10,
        ..Default::default()
    };
    let credentials = match &args.remote_credentials {
        Some(file) => Some(snapd::remote::Remotes::credentials_file(file)?),
        None if args.remotes.is_empty() => None,
        None => Some(snap_remote::Credentials::from_env()?),
    };
    let remotes = snapd::remote::Remotes::new(
        &args.remotes,
        credentials.as_ref(),
        i64::try_from(args.remote_grace_secs.saturating_mul(1000)).unwrap_or(i64::MAX),
    )?
    .with_cache(
        &args.data_dir.join("cache").join("chunks"),
        args.remote_cache_gib << 30,
    )?;
    let daemon = Daemon::open(Config {
        data_dir: args.data_dir.clone(),
        layer_options,
        failpoints,
        copy_before_resume: args.copy_before_resume_mib << 20,
        warm_pool: args.warm_pool,
        store: StoreOptions {
            reserve_bytes: args.reserve_mib << 20,
            keep_unknown_files: args.keep_unknown_files,
        },
        images,
        copy_mode: args.snapshot_copy,
        remotes,
    })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    let result = runtime.block_on(serve(Arc::clone(&daemon), &args));
    daemon.shutdown();
    result
}

/// A router whose calls are authorized by [`AuthLayer`].
type Router = tonic::transport::server::Router<Stack<AuthLayer, Identity>>;

/// The services every listener serves, each call authorized for `listener`: snapd, gRPC health,
/// and reflection (v1 and v1alpha, for grpcurl and grpcio-reflection old and new).
async fn services(
    daemon: &Arc<Daemon>,
    listener: Listener,
    tls: Option<ServerTlsConfig>,
) -> Result<Router, String> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<SnapdServer<Service>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(snap_api::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let v1 = reflection()
        .build_v1()
        .map_err(|e| format!("reflection: {e}"))?;
    let v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| format!("reflection: {e}"))?;
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server
            .tls_config(tls)
            .map_err(|e| format!("TLS configuration: {e}"))?;
    }
    Ok(server
        .layer(AuthLayer(listener))
        .add_service(health)
        .add_service(v1)
        .add_service(v1alpha)
        .add_service(SnapdServer::new(Service::new(Arc::clone(daemon)))))
}

/// Binds the Unix socket at `path`: a socket a dead daemon left is replaced, but one a live
/// daemon answers on (whatever its data directory) is not taken over, and a path that is not a
/// socket is not removed.
fn bind_socket(path: &std::path::Path) -> Result<UnixListener, String> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(format!(
                "{} exists and is not a socket: remove it, or give another --socket",
                path.display()
            ));
        }
        Ok(_) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(format!(
                    "another snapd is listening on {}: stop it, or give this one another --socket",
                    path.display()
                ));
            }
            // A socket left by a daemon that died.
            std::fs::remove_file(path).map_err(|e| format!("removing {}: {e}", path.display()))?;
        }
        Err(_) => {}
    }
    let listener =
        UnixListener::bind(path).map_err(|e| format!("binding {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("chmod {}: {e}", path.display()))?;
    Ok(listener)
}

/// The TLS configuration the TCP listener needs, from the flags.
///
/// # Errors
/// What is missing or unreadable.
fn tcp_tls(args: &Args) -> Result<Option<ServerTlsConfig>, String> {
    if args.tcp.is_none() || args.insecure_plaintext_tcp {
        return Ok(None);
    }
    let (Some(cert), Some(key), Some(ca)) = (&args.tls_cert, &args.tls_key, &args.tls_client_ca)
    else {
        return Err(
            "--tcp needs --tls-cert, --tls-key and --tls-client-ca (TCP is served with TLS \
                    and client certificates; --insecure-plaintext-tcp is for tests only)"
                .into(),
        );
    };
    snap_api::client::use_ring_for_tls();
    let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()));
    Ok(Some(
        ServerTlsConfig::new()
            .identity(TlsIdentity::from_pem(read(cert)?, read(key)?))
            .client_ca_root(Certificate::from_pem(read(ca)?))
            // A call without a certificate gets a clear UNAUTHENTICATED (health answers it).
            .client_auth_optional(true),
    ))
}

async fn serve(daemon: Arc<Daemon>, args: &Args) -> Result<(), String> {
    // Housekeeping: VMs whose guest finished, failed or paused on its own are reported every
    // 100 ms; VMs a full disk paused are resumed once space is back (every second); files
    // nothing names are removed and old operations forgotten every 10 s.
    let keeper = Arc::clone(&daemon);
    tokio::spawn(async move {
        for tick in 1u64.. {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let d = Arc::clone(&keeper);
            let _ = tokio::task::spawn_blocking(move || {
                if tick % 10 == 0 {
                    d.resume_after_disk_full();
                }
                d.housekeeping(tick % 100 == 0);
            })
            .await;
        }
    });

    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
    };
    if let Some(addr) = args.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("--metrics {addr}: binding: {e}"))?;
        tracing::info!(%addr, "serving metrics at /metrics");
        tokio::spawn(snapd::metrics::serve(Arc::clone(&daemon), listener));
    }
    let tls = tcp_tls(args)?;
    let tcp_listener = if tls.is_some() {
        Listener::Tls
    } else {
        Listener::PlainTcp
    };
    if args.insecure_plaintext_tcp {
        tracing::warn!(
            "TCP is served in plain text without authentication (--insecure-plaintext-tcp): \
             anyone who reaches the port controls every VM"
        );
    }

    match (&args.tcp, args.no_socket) {
        (Some(addr), true) => {
            let router = services(&daemon, tcp_listener, tls).await?;
            tracing::info!(%addr, "listening on TCP");
            router
                .serve_with_shutdown(*addr, shutdown)
                .await
                .map_err(|e| format!("serving on {addr}: {e}"))
        }
        (tcp, _) => {
            let path = args
                .socket
                .clone()
                .unwrap_or_else(|| Store::socket_path(&args.data_dir));
            let listener = bind_socket(&path)?;
            tracing::info!(socket = %path.display(), "listening");
            let router = services(&daemon, Listener::Unix, None).await?;
            if let Some(addr) = tcp {
                let tcp_router = services(&daemon, tcp_listener, tls).await?;
                let addr = *addr;
                tracing::info!(%addr, "listening on TCP");
                tokio::spawn(async move {
                    if let Err(e) = tcp_router.serve(addr).await {
                        tracing::error!(error = %e, "TCP listener failed");
                    }
                });
            }
            let served = router
                .serve_with_incoming_shutdown(
                    UnixListenerStream::new(listener).map(|s| s.map(AuthorityFix::new)),
                    shutdown,
                )
                .await
                .map_err(|e| format!("serving on {}: {e}", path.display()));
            // A clean stop leaves no socket behind.
            let _ = std::fs::remove_file(&path);
            served
        }
    }
}
