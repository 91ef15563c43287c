//! snapd on TCP: TLS with client certificates made by `tools/snapd-certs` (the README's
//! commands), roles from the certificate, and the caller recorded on operations and events.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use snap_api::client::Tls;
use snap_api::v1 as pb;

use super::common::*;
use super::service::assert_stock_services;
use snap_testkit::free_port;

/// A directory of certificates: the CA, snapd's, an admin's, a read-only one's, one without a
/// role, and one from another CA.
pub struct Certs {
    pub dir: tempfile::TempDir,
}

fn certs_tool(dir: &Path, args: &[&str]) {
    let tool = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/snapd-certs");
    let out = Command::new(tool).arg(dir).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "snapd-certs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Certs {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        certs_tool(d, &["ca"]);
        certs_tool(d, &["server", "localhost", "127.0.0.1"]);
        certs_tool(d, &["client", "ops", "admin"]);
        certs_tool(d, &["client", "dashboard", "read-only"]);
        certs_tool(&d.join("other"), &["ca"]);
        certs_tool(&d.join("other"), &["client", "intruder", "admin"]);
        // Signed by the right CA, but naming no role.
        let script = format!(
            "cd {0} && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out nobody.key \
             && openssl req -new -key nobody.key -subj /O=elsewhere/CN=nobody -out nobody.csr \
             && printf 'extendedKeyUsage=clientAuth\\n' > ext \
             && openssl x509 -req -in nobody.csr -CA ca.pem -CAkey ca.key -days 2 -out nobody.pem -extfile ext",
            d.display()
        );
        let out = Command::new("bash").arg("-c").arg(script).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The daemon's TLS flags.
    pub fn daemon_args(&self) -> Vec<String> {
        [
            ("--tls-cert", "server.pem"),
            ("--tls-key", "server.key"),
            ("--tls-client-ca", "ca.pem"),
        ]
        .iter()
        .flat_map(|(flag, file)| [flag.to_string(), self.path(file).display().to_string()])
        .collect()
    }

    /// A client presenting `who`'s certificate (none for None).
    pub fn tls(&self, who: Option<&str>) -> Tls {
        Tls {
            ca: Some(self.path("ca.pem")),
            cert: who.map(|w| self.path(&format!("{w}.pem"))),
            key: who.map(|w| self.path(&format!("{w}.key"))),
        }
    }
}

/// A daemon serving TCP with TLS on a free port, and its `https://` address.
pub fn tls_daemon(certs: &Certs) -> (Snapd, String) {
    let port = free_port();
    let mut args = vec!["--tcp".to_string(), format!("127.0.0.1:{port}")];
    args.extend(certs.daemon_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut d = Snapd::new(SNAPD, &args);
    d.start("");
    (d, format!("https://localhost:{port}"))
}

/// A client of `addr` as `who`, once the listener answers.
pub async fn tls_client(addr: &str, tls: &Tls) -> Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(c) = snap_api::client::connect_with(addr, tls).await {
            return c;
        }
        assert!(Instant::now() < deadline, "no TLS connection to {addr}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// TCP is TLS with client certificates: an admin certificate may do everything, a read-only one
/// gets and lists but cannot change anything, a call without a certificate is UNAUTHENTICATED
/// (health still answers it), a certificate naming no role is PERMISSION_DENIED, and one from
/// another CA never gets through the handshake. Plain text on TCP needs its loud flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_certificates_and_roles() {
    let certs = Certs::new();
    let (_daemon, addr) = tls_daemon(&certs);
    let mut admin = tls_client(&addr, &certs.tls(Some("ops"))).await;
    assert!(
        admin
            .list_vms(pb::ListVmsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .vms
            .is_empty()
    );
    // The admin passes the role check: the daemon looks for the snapshot.
    let missing = "0123456789abcdef0123456789abcdef";
    let delete = || pb::DeleteSnapshotRequest {
        request_id: rid("del"),
        snapshot_id: missing.into(),
        ..Default::default()
    };
    let e = admin.delete_snapshot(delete()).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");

    let mut reader = tls_client(&addr, &certs.tls(Some("dashboard"))).await;
    reader
        .list_vms(pb::ListVmsRequest::default())
        .await
        .unwrap();
    reader
        .list_operations(pb::ListOperationsRequest::default())
        .await
        .unwrap();
    let e = reader.delete_snapshot(delete()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(
        e.message()
            .contains("cert:CN=dashboard has the read-only role")
            && e.message().contains("DeleteSnapshot"),
        "{e}"
    );
    let e = reader
        .create_vm(vm_request("nope", false, guest()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");

    let anonymous = snap_api::client::channel_with(&addr, &certs.tls(None))
        .await
        .unwrap();
    let e = Client::new(anonymous.clone())
        .list_vms(pb::ListVmsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    assert!(e.message().contains("client certificate is needed"), "{e}");
    assert_stock_services(anonymous, "TLS without a certificate").await;

    let mut nobody = tls_client(&addr, &certs.tls(Some("nobody"))).await;
    let e = nobody
        .list_vms(pb::ListVmsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(e.message().contains("CN=nobody names no snapd role"), "{e}");

    let intruder = Tls {
        ca: Some(certs.path("ca.pem")),
        cert: Some(certs.path("other/intruder.pem")),
        key: Some(certs.path("other/intruder.key")),
    };
    match snap_api::client::connect_with(&addr, &intruder).await {
        Err(_) => {}
        Ok(mut c) => {
            let e = c.list_vms(pb::ListVmsRequest::default()).await.unwrap_err();
            assert_ne!(e.code(), Code::Ok);
        }
    }

    // TCP without TLS is refused unless asked for by its loud name.
    let port = free_port();
    let mut plain = Snapd::new(SNAPD, &["--tcp", &format!("127.0.0.1:{port}")]);
    let err = plain.try_start("", &[]).unwrap_err();
    assert!(err.contains("--tcp needs --tls-cert"), "{err}");
}

/// Every operation records who asked for it, and every event who caused it: the certificate's
/// name over TLS, the uid and pid on the socket; what the daemon does by itself names no one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_and_events_name_their_caller() {
    if !kvm_available("operations_and_events_name_their_caller") {
        return;
    }
    let certs = Certs::new();
    let (daemon, addr) = tls_daemon(&certs);
    let mut admin = tls_client(&addr, &certs.tls(Some("ops"))).await;
    let mut local = daemon.client().await;
    let mut events = local
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let vm = create_vm(&mut admin, "named", true).await;
    let snap = take_snapshot(&mut admin, &vm.id, "by-ops").await;
    let op = local
        .list_operations(pb::ListOperationsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .operations;
    assert_eq!(op.len(), 1, "{op:?}");
    assert_eq!(op[0].caller, "cert:CN=ops");
    let started = local
        .delete_snapshot(pb::DeleteSnapshotRequest {
            request_id: rid("del"),
            snapshot_id: snap.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let deleted = wait_op(&mut local, started).await;
    let unix = format!("unix:uid=0,pid={}", std::process::id());
    assert_eq!(deleted.caller, unix);

    // The stream: the VM made and the snapshot taken over TLS, the snapshot deleted on the socket.
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|e: &pb::Event| matches!(e.kind, Some(pb::event::Kind::SnapshotDeleted(_))))
    {
        let e = tokio::time::timeout(TIMEOUT, events.message())
            .await
            .expect("the events came")
            .unwrap()
            .unwrap();
        seen.push(e);
    }
    for e in &seen {
        let want = match &e.kind {
            Some(pb::event::Kind::SnapshotDeleted(_)) => unix.as_str(),
            Some(pb::event::Kind::Operation(o)) if o.id == deleted.id => unix.as_str(),
            Some(pb::event::Kind::SnapshotCreated(_) | pb::event::Kind::Operation(_)) => {
                "cert:CN=ops"
            }
            // A VM event: made by ops, or (housekeeping) the guest's own progress.
            _ => continue,
        };
        assert_eq!(e.caller, want, "{e:?}");
    }
    assert!(
        seen.iter().any(
            |e| matches!(&e.kind, Some(pb::event::Kind::Vm(v)) if v.id == vm.id)
                && e.caller == "cert:CN=ops"
        ),
        "the VM's creation names its caller: {seen:?}"
    );
}

/// Whether Python grpcio (with grpcio-tools, -health-checking and -reflection) is installed;
/// `.ci/run` installs it and sets SNAP_REQUIRE_GRPCIO=1, so there its absence fails the test.
fn python_grpcio(test: &str) -> bool {
    let ok = Command::new("python3")
        .args([
            "-c",
            "import grpc, grpc_tools, grpc_health.v1.health_pb2, grpc_reflection.v1alpha.reflection_pb2",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("SNAP_REQUIRE_GRPCIO").as_deref() != Ok("1"),
            "{test}: Python grpcio is missing (pip install grpcio grpcio-tools \
             grpcio-health-checking grpcio-reflection)"
        );
        println!("SKIP {test}: Python grpcio is not installed");
    }
    ok
}

/// A stock Python grpcio client, with no channel options, calls health, ListVms and reflection
/// over the Unix socket (whose path it sends as its :authority) and over TLS with a client
/// certificate, and is refused UNAUTHENTICATED over TLS without one
/// (`tests/python/stock_client.py`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_over_the_socket_and_tls() {
    if !python_grpcio("python_grpcio_over_the_socket_and_tls") {
        return;
    }
    let certs = Certs::new();
    let (daemon, addr) = tls_daemon(&certs);
    let _ = tls_client(&addr, &certs.tls(Some("ops"))).await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let stubs = tempfile::tempdir().unwrap();
    let out = Command::new("python3")
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(root.join("proto"))
        .arg(format!("--python_out={}", stubs.path().display()))
        .arg(format!("--grpc_python_out={}", stubs.path().display()))
        .arg(root.join("proto/snapd/v1/snapd.proto"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("python3")
        .arg(root.join("tests/python/stock_client.py"))
        .arg(stubs.path())
        .arg(daemon.socket())
        .arg(addr.trim_start_matches("https://"))
        .arg(certs.path("ca.pem"))
        .arg(certs.path("ops.pem"))
        .arg(certs.path("ops.key"))
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{said}\ndaemon log:\n{}",
        daemon.log()
    );
    assert!(said.contains("unix socket: health SERVING"), "{said}");
    assert!(
        said.contains("TLS without a client certificate: UNAUTHENTICATED"),
        "{said}"
    );
}
