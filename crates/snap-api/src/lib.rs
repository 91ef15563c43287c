//! The snapd v1 API as generated Rust: messages ([`v1`]), the client
//! ([`v1::snapd_client::SnapdClient`]) and the server trait ([`v1::snapd_server::Snapd`]).
//!
//! The stubs are generated at build time from `proto/snapd/v1/snapd.proto` with protox (no
//! `protoc` needed). The proto file documents every call, field and error code.
//!
//! snapd listens on a Unix socket (`<data dir>/snapd.sock`) by default. A tonic channel connects
//! to it through a connector that ignores the URI; `examples/list_vms.rs` shows the whole client:
//!
//! ```no_run
//! use hyper_util::rt::TokioIo;
//! use snap_api::v1::{ListVmsRequest, snapd_client::SnapdClient};
//! use tonic::transport::{Endpoint, Uri};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let socket = "/var/lib/snapvm/snapd.sock";
//! let channel = Endpoint::try_from("http://snapd")?
//!     .connect_with_connector(tower::service_fn(move |_: Uri| async move {
//!         Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(socket).await?))
//!     }))
//!     .await?;
//! let mut client = SnapdClient::new(channel);
//! let vms = client.list_vms(ListVmsRequest::default()).await?.into_inner();
//! for vm in vms.vms {
//!     println!("{} {} {:?}", vm.id, vm.name, vm.state());
//! }
//! # Ok(())
//! # }
//! ```

/// Package `snapd.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("snapd.v1");

    /// The encoded file descriptor set of `snapd.v1`, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/snapd_v1_descriptor.bin"));
}
