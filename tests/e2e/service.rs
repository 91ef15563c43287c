//! The service's edges: health and reflection for stock clients (socket and TCP), one daemon per
//! directory and per socket, a private data directory.

use std::time::{Duration, Instant};

use snap_api::v1 as pb;

use super::common::*;

/// Asserts that `channel` serves what stock clients ask for: health says SERVING, and
/// reflection, in both its versions (v1, and v1alpha for grpcio-reflection and older grpcurl),
/// lists the snapd and health services.
pub async fn assert_stock_services(channel: tonic::transport::Channel, what: &str) {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::{v1, v1alpha};

    let health = HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: "snapd.v1.Snapd".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving,
        "{what}"
    );

    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut stream = v1::server_reflection_client::ServerReflectionClient::new(channel.clone())
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = stream.message().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("{what}: unexpected reflection answer {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in ["snapd.v1.Snapd", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == service), "{what}: {names:?}");
    }

    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut stream = v1alpha::server_reflection_client::ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = stream.message().await.unwrap().unwrap();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("{what}: unexpected v1alpha reflection answer {response:?}");
    };
    assert!(
        list.service.iter().any(|s| s.name == "snapd.v1.Snapd"),
        "{what}: v1alpha lists {:?}",
        list.service
    );
}

/// Stock gRPC clients find their way over the socket: health and reflection (v1 and v1alpha).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served() {
    let (daemon, _) = start("").await;
    let channel = snap_api::client::channel(daemon.socket().to_str().unwrap())
        .await
        .unwrap();
    assert_stock_services(channel, "the socket").await;
    // The socket is the owner's alone.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(daemon.socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
}

/// On request the daemon listens on TCP too, serving the same API; a second daemon on the same
/// data directory is refused with a message naming the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listener_and_one_daemon_per_directory() {
    let (daemon, _) = start("").await;
    // A free port: bind, read it, release it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut tcp = Snapd::new(
        SNAPD,
        &[
            "--tcp",
            &format!("127.0.0.1:{port}"),
            "--insecure-plaintext-tcp",
        ],
    );
    tcp.start("");
    let addr = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let vms = loop {
        if let Ok(mut c) = snap_api::client::connect(&addr).await {
            if let Ok(r) = c.list_vms(pb::ListVmsRequest::default()).await {
                break r.into_inner().vms;
            }
        }
        assert!(Instant::now() < deadline, "snapd never answered on {addr}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(vms.is_empty());
    let channel = snap_api::client::channel(&addr).await.unwrap();
    assert_stock_services(channel, "TCP").await;
    drop(tcp);

    let mut second = Snapd::at(SNAPD, daemon.data(), &[]);
    let err = second
        .try_start("", &[])
        .expect_err("a second daemon is refused");
    assert!(err.contains("another snapd is using"), "{err}");
}

/// A second daemon (another data directory) on a live daemon's socket is refused and the first
/// serves on; a daemon stopped cleanly removes its socket, and one killed leaves a socket the
/// next daemon replaces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_daemons_socket_is_never_taken_over() {
    let (mut first, mut c) = start("").await;
    let socket = first.socket();
    let socket_arg = socket.to_str().unwrap().to_string();
    let mut second = Snapd::new(SNAPD, &["--socket", &socket_arg]);
    let err = second
        .try_start("", &[])
        .expect_err("a second daemon on a live socket is refused");
    assert!(err.contains("another snapd is listening on"), "{err}");
    assert!(
        list_vms(&mut c).await.is_empty(),
        "the first daemon serves on"
    );

    first.stop();
    assert!(!socket.exists(), "a clean stop removes the socket");
    first.start("");
    first.kill9();
    assert!(socket.exists(), "a killed daemon leaves its socket");
    let mut c = respawn(&mut first, "").await;
    assert!(list_vms(&mut c).await.is_empty());
}

/// The data directory is the daemon's alone: after VMs, disks, snapshots, restores and deletes,
/// every directory in it is mode 0700 and every file 0600, and a directory found wider is
/// narrowed at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_directory_is_private() {
    use std::os::unix::fs::PermissionsExt;
    if !kvm_available("the_data_directory_is_private") {
        return;
    }
    let mut daemon = Snapd::new(SNAPD, &[]);
    std::fs::create_dir_all(daemon.data()).unwrap();
    std::fs::set_permissions(daemon.data(), std::fs::Permissions::from_mode(0o755)).unwrap();
    daemon.start("");
    let mut c = daemon.client().await;
    let v = create_vm_running(&mut c, "v", true, long_guest()).await;
    wait_lines(&mut c, &v.id, 2).await;
    let a = take_snapshot(&mut c, &v.id, "a").await;
    let b = take_snapshot(&mut c, &v.id, "b").await;
    let r = restore_new(&mut c, &a.id, "r", pb::MemoryRestoreMode::Prefetch).await;
    wait_lines(&mut c, &r.id, 2).await;
    delete_snapshot(&mut c, &b.id).await;
    let mut dirs = vec![daemon.data().to_path_buf()];
    let mut seen = 0;
    while let Some(dir) = dirs.pop() {
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", dir.display());
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                dirs.push(e.path());
            } else {
                seen += 1;
                let mode = m.permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", e.path().display());
            }
        }
    }
    assert!(seen > 8, "checked {seen} files");
}
