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
    let port = snap_testkit::free_port();
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

/// A field of /proc/<pid>/status, in its unit (kB for memory).
fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{field} in {status}"))
}

/// A flood of calls stays bounded: 250 concurrent readers of a whole console, with 250 lists
/// beside them, grow neither threads nor memory without bound (console reads come a window of
/// at most 1 MiB at a time, and at most 32 reads and 64 changes run on threads at once); a huge
/// id is answered with a short error; page sizes are cut to 1000, and a page token works only
/// for the list and filters that made it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_calls_stay_bounded() {
    if !kvm_available("floods_of_calls_stay_bounded") {
        return;
    }
    let (daemon, mut c) = start("").await;
    let pid = daemon.pid().unwrap();
    let chatty = create_vm_running(&mut c, "chatty", true, long_guest()).await;
    let _quiet = create_vm(&mut c, "quiet", false).await;
    // Let the console grow a while.
    wait_lines(&mut c, &chatty.id, 100).await;
    let console_bytes = console(&mut c, &chatty.id).await.len();

    let rss_before = proc_status(pid, "VmRSS");
    let threads_before = proc_status(pid, "Threads");
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..500 {
        let mut c = c.clone();
        let id = chatty.id.clone();
        calls.spawn(async move {
            if i % 2 == 1 {
                c.list_vms(pb::ListVmsRequest::default()).await.unwrap();
                return 0;
            }
            let mut offset = 0;
            loop {
                let r = c
                    .get_vm_console(pb::GetVmConsoleRequest {
                        vm_id: id.clone(),
                        offset,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                if r.data.is_empty() {
                    return offset;
                }
                offset = r.next_offset;
            }
        });
    }
    let mut threads_peak = threads_before;
    while !calls.is_empty() {
        threads_peak = threads_peak.max(proc_status(pid, "Threads"));
        if let Ok(Some(done)) =
            tokio::time::timeout(Duration::from_millis(5), calls.join_next()).await
        {
            done.unwrap();
        }
    }
    let peak_rss = proc_status(pid, "VmHWM");
    println!(
        "console {console_bytes} bytes or more; RSS {rss_before} kB before, peak {peak_rss} kB; \
         threads {threads_before} before, peak {threads_peak}"
    );
    assert!(
        threads_peak <= threads_before + 32 + 64,
        "threads grew from {threads_before} to {threads_peak}"
    );
    assert!(
        peak_rss < rss_before + 256 * 1024,
        "RSS grew from {rss_before} kB to a peak of {peak_rss} kB"
    );

    // A huge id: a short error.
    let e = c
        .get_vm(pb::GetVmRequest {
            vm_id: "x".repeat(3 << 20),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().len() < 200, "{} bytes", e.message().len());

    // Pages: a huge size is cut to the maximum; a token goes with its list and filters.
    let all = c
        .list_vms(pb::ListVmsRequest {
            page_size: 1_000_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.vms.len(), 2);
    assert!(all.next_page_token.is_empty());
    let first = c
        .list_vms(pb::ListVmsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.vms.len(), 1);
    let token = first.next_page_token;
    let second = c
        .list_vms(pb::ListVmsRequest {
            page_size: 1,
            page_token: token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.vms.len(), 1);
    assert_ne!(second.vms[0].id, first.vms[0].id);
    let e = c
        .list_snapshots(pb::ListSnapshotsRequest {
            page_token: token.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("page_token"), "{e}");
    let e = c
        .list_vms(pb::ListVmsRequest {
            page_token: token,
            labels: [("team".to_string(), "a".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
}
