//! The service's edges: health and reflection for stock clients, TCP, one daemon per directory.

use std::time::{Duration, Instant};

use snap_api::v1 as pb;

use super::common::*;

/// Stock gRPC clients find their way: the health service says SERVING and reflection lists the
/// snapd service (what grpcurl asks for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let (daemon, _) = start("").await;
    let channel = snap_api::client::channel(daemon.socket().to_str().unwrap())
        .await
        .unwrap();
    let health = HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: "snapd.v1.Snapd".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"snapd.v1.Snapd".to_string()), "{names:?}");
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
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
    let mut tcp = Snapd::new(SNAPD, &["--tcp", &format!("127.0.0.1:{port}")]);
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
    drop(tcp);

    let mut second = Snapd::at(SNAPD, daemon.data(), &[]);
    let err = second
        .try_start("", &[])
        .expect_err("a second daemon is refused");
    assert!(err.contains("another snapd is using"), "{err}");
}
