//! A complete snapd client: connects to the daemon's Unix socket and prints its VMs and each
//! VM's snapshot tree.
//!
//! Run: `cargo run -p snap-api --features client --example list_vms -- /var/lib/snapvm/snapd.sock`
//! (or `http://127.0.0.1:7325` for a daemon listening on TCP).

use snap_api::v1::{GetSnapshotTreeRequest, ListVmsRequest};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let target = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/var/lib/snapvm/snapd.sock".into());
    let mut client = snap_api::client::connect(&target).await?;
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
