//! A complete snapd client: connects to the daemon's Unix socket and prints its VMs and each
//! VM's snapshot tree.
//!
//! Run: `cargo run -p snap-api --example list_vms -- /var/lib/snapvm/snapd.sock`
//! (or `http://127.0.0.1:7325` for a daemon listening on TCP).

use hyper_util::rt::TokioIo;
use snap_api::v1::snapd_client::SnapdClient;
use snap_api::v1::{GetSnapshotTreeRequest, ListVmsRequest};
use tonic::transport::{Channel, Endpoint, Uri};

/// A channel to `target`: a Unix socket path, or an http:// address.
async fn connect(target: String) -> Result<Channel, Box<dyn std::error::Error>> {
    if target.starts_with("http://") {
        return Ok(Endpoint::try_from(target)?.connect().await?);
    }
    // The URI is not used: every connection goes to the socket.
    let channel = Endpoint::try_from("http://snapd")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = target.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await?;
    Ok(channel)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let target = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/var/lib/snapvm/snapd.sock".into());
    let mut client = SnapdClient::new(connect(target).await?);
    let mut page_token = String::new();
    loop {
        let page = client
            .list_vms(ListVmsRequest {
                page_token,
                ..Default::default()
            })
            .await?
            .into_inner();
        for vm in page.vms {
            println!(
                "vm {} {:?} {} ({})",
                vm.name,
                vm.state(),
                vm.id,
                vm.memory_bytes
            );
            let tree = client
                .get_snapshot_tree(GetSnapshotTreeRequest { vm_id: vm.id })
                .await?
                .into_inner();
            for node in tree.nodes {
                let s = node.snapshot.unwrap_or_default();
                let current = if s.id == tree.current_snapshot_id {
                    " (current)"
                } else {
                    ""
                };
                println!(
                    "  snapshot {} {} parent {:?}{current}",
                    s.name, s.id, s.parent_id
                );
            }
        }
        if page.next_page_token.is_empty() {
            return Ok(());
        }
        page_token = page.next_page_token;
    }
}
