//! Who calls, and what they may do.
//!
//! Every call is made by a [`Caller`]: an identity, recorded on every operation it starts and
//! every event it causes, and a [`Role`]:
//!
//! - on the Unix socket (mode 0600 in a 0700 directory: only the daemon's user reaches it), the
//!   peer's uid and pid from `SO_PEERCRED` (`unix:uid=0,pid=42`), with the admin role;
//! - on TCP with TLS, the client certificate the handshake verified against `--tls-client-ca`:
//!   its subject's common name (`cert:CN=dashboard`), with the role its subject's Organization
//!   names: `O=snapd:admin` (every call) or `O=snapd:read-only` (gets, lists, consoles, trees,
//!   waits and the event stream). A certificate with neither is refused PERMISSION_DENIED: roles
//!   are given by the CA that signs the certificates, never by default. A call without a client
//!   certificate is refused UNAUTHENTICATED; one signed by another CA fails the TLS handshake.
//! - on plain TCP (`--insecure-plaintext-tcp`, for tests only), `tcp:ADDR`, with the admin role.
//!
//! Health (`grpc.health.v1.Health`) and reflection answer anyone who can connect: they say
//! nothing about VMs or snapshots.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::Status;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo, UdsConnectInfo};

/// Organization naming the admin role in a client certificate's subject.
pub const ADMIN_ORG: &str = "snapd:admin";
/// Organization naming the read-only role.
pub const READ_ONLY_ORG: &str = "snapd:read-only";

/// The snapd methods a read-only caller may call; every other snapd method needs the admin role.
const READ_ONLY_METHODS: &[&str] = &[
    "GetVm",
    "ListVms",
    "GetVmConsole",
    "GetSnapshot",
    "ListSnapshots",
    "GetSnapshotTree",
    "ListRemoteSnapshots",
    "GetOperation",
    "ListOperations",
    "WaitOperation",
    "WatchEvents",
];

/// Services anyone who can connect may call.
const OPEN_SERVICES: &[&str] = &[
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Gets, lists and watches only.
    ReadOnly,
    /// Every call.
    Admin,
}

/// Who makes a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Recorded on operations and events.
    pub identity: String,
    /// What it may do.
    pub role: Role,
}

/// How a listener's callers are known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// The Unix socket.
    Unix,
    /// TCP with TLS and client certificates.
    Tls,
    /// Plain TCP, for tests only.
    PlainTcp,
}

thread_local! {
    static ACTING: RefCell<String> = const { RefCell::new(String::new()) };
}

tokio::task_local! {
    static CALLING: Caller;
}

/// Runs `f` on this thread on behalf of `identity`: events it emits name it.
pub fn acting_as<R>(identity: &str, f: impl FnOnce() -> R) -> R {
    let before = ACTING.with(|a| std::mem::replace(&mut *a.borrow_mut(), identity.to_string()));
    struct Restore(Option<String>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(before) = self.0.take() {
                ACTING.with(|a| *a.borrow_mut() = before);
            }
        }
    }
    let _restore = Restore(Some(before));
    f()
}

/// The identity this thread acts for (empty for what the daemon does by itself).
pub fn acting() -> String {
    ACTING.with(|a| a.borrow().clone())
}

/// The caller of the call being answered on this task (none outside a call).
pub fn calling() -> Option<Caller> {
    CALLING.try_with(Clone::clone).ok()
}

/// The subject's common name and organizations of a DER certificate.
fn subject(der: &[u8]) -> Result<(String, Vec<String>), String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("unreadable certificate: {e}"))?;
    let subject = cert.subject();
    let names = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue<'_>>| {
        it.filter_map(|a| a.as_str().ok().map(str::to_string))
            .collect::<Vec<_>>()
    };
    let cn = names(&mut subject.iter_common_name());
    let orgs = names(&mut subject.iter_organization());
    let cn = cn
        .into_iter()
        .next()
        .ok_or("the client certificate's subject has no common name (CN)")?;
    Ok((cn, orgs))
}

/// The caller of a call to `path` made over `listener`, or the status refusing it.
///
/// # Errors
/// UNAUTHENTICATED without a client certificate on TLS, PERMISSION_DENIED for a certificate
/// without a snapd role or a read-only caller of a mutating method.
fn authorize<B>(listener: Listener, req: &http::Request<B>) -> Result<Caller, Status> {
    let path = req.uri().path();
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""));
    let ext = req.extensions();
    let caller = match listener {
        Listener::Unix => {
            let cred = ext.get::<UdsConnectInfo>().and_then(|i| i.peer_cred);
            let identity = match cred {
                Some(c) => match c.pid() {
                    Some(pid) => format!("unix:uid={},pid={pid}", c.uid()),
                    None => format!("unix:uid={}", c.uid()),
                },
                None => "unix".to_string(),
            };
            Caller {
                identity,
                role: Role::Admin,
            }
        }
        Listener::PlainTcp => {
            let addr = ext.get::<TcpConnectInfo>().and_then(|i| i.remote_addr());
            Caller {
                identity: addr.map_or_else(|| "tcp".to_string(), |a| format!("tcp:{a}")),
                role: Role::Admin,
            }
        }
        Listener::Tls => {
            let certs = ext
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(TlsConnectInfo::peer_certs);
            let leaf = certs.as_ref().and_then(|c| c.first());
            match leaf {
                None if OPEN_SERVICES.contains(&service) => Caller {
                    identity: "anonymous".into(),
                    role: Role::ReadOnly,
                },
                None => {
                    return Err(Status::unauthenticated(
                        "a client certificate is needed: this daemon takes TLS clients with a \
                         certificate signed by its client CA (see the README, \"snapd on TCP\")",
                    ));
                }
                Some(der) => {
                    let (cn, orgs) = subject(der).map_err(Status::unauthenticated)?;
                    let role = if orgs.iter().any(|o| o == ADMIN_ORG) {
                        Role::Admin
                    } else if orgs.iter().any(|o| o == READ_ONLY_ORG) {
                        Role::ReadOnly
                    } else {
                        return Err(Status::permission_denied(format!(
                            "the client certificate CN={cn} names no snapd role: its subject \
                             needs O={ADMIN_ORG} or O={READ_ONLY_ORG}"
                        )));
                    };
                    Caller {
                        identity: format!("cert:CN={cn}"),
                        role,
                    }
                }
            }
        }
    };
    let allowed = caller.role == Role::Admin
        || OPEN_SERVICES.contains(&service)
        || (service == "snapd.v1.Snapd" && READ_ONLY_METHODS.contains(&method));
    if !allowed {
        return Err(Status::permission_denied(format!(
            "{} has the read-only role: it may not call {method} (read-only callers may call {})",
            caller.identity,
            READ_ONLY_METHODS.join(", ")
        )));
    }
    Ok(caller)
}

/// The layer that authorizes every call on a listener (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct AuthLayer(pub Listener);

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Authorized<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authorized {
            inner,
            listener: self.0,
        }
    }
}

/// A service whose calls are authorized first.
#[derive(Debug, Clone)]
pub struct Authorized<S> {
    inner: S,
    listener: Listener,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Authorized<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match authorize(self.listener, &req) {
            Ok(caller) => Box::pin(CALLING.scope(caller, self.inner.call(req))),
            Err(status) => {
                tracing::warn!(path = req.uri().path(), error = %status.message(), "call refused");
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_act_for_one_caller_at_a_time() {
        assert_eq!(acting(), "");
        acting_as("cert:CN=a", || {
            assert_eq!(acting(), "cert:CN=a");
            acting_as("unix:uid=0", || assert_eq!(acting(), "unix:uid=0"));
            assert_eq!(acting(), "cert:CN=a");
        });
        assert_eq!(acting(), "");
    }

    #[test]
    fn plain_callers_are_admins_and_unknown_methods_need_the_admin_role() {
        let req = |path: &str| http::Request::builder().uri(path).body(()).unwrap();
        let c = authorize(Listener::Unix, &req("/snapd.v1.Snapd/DeleteVm")).unwrap();
        assert_eq!(c.role, Role::Admin);
        let e = authorize(Listener::Tls, &req("/snapd.v1.Snapd/ListVms")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let c = authorize(Listener::Tls, &req("/grpc.health.v1.Health/Check")).unwrap();
        assert_eq!(c.role, Role::ReadOnly);
    }
}
