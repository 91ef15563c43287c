"""A stock gRPC client (Python grpcio from PyPI, no channel options) against a running snapd.

Usage: stock_client.py STUBS SOCKET HOST:PORT CA CERT KEY

STUBS holds the Python stubs grpc_tools.protoc made from proto/snapd/v1/snapd.proto. Over the
Unix socket and over TLS (with the client certificate CERT/KEY, trusting CA) it checks health,
ListVms and reflection (v1alpha, as grpcio-reflection speaks it); over TLS without a client
certificate, that ListVms is refused UNAUTHENTICATED. Exits non-zero on the first failure.
"""

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

stubs, socket, hostport, ca, cert, key = sys.argv[1:7]
sys.path.insert(0, stubs)
from snapd.v1 import snapd_pb2, snapd_pb2_grpc  # noqa: E402


def check(channel, what):
    status = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="snapd.v1.Snapd"), timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING, (what, status)
    vms = snapd_pb2_grpc.SnapdStub(channel).ListVms(snapd_pb2.ListVmsRequest(), timeout=10)
    assert isinstance(vms.vms, object), what
    replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    names = [s.name for r in replies for s in r.list_services_response.service]
    assert "snapd.v1.Snapd" in names and "grpc.health.v1.Health" in names, (what, names)
    print(f"{what}: health SERVING, ListVms answered ({len(vms.vms)} VMs), reflection lists {len(names)} services")


check(grpc.insecure_channel(f"unix://{socket}"), "unix socket")

read = lambda p: open(p, "rb").read()
with_cert = grpc.ssl_channel_credentials(read(ca), read(key), read(cert))
check(grpc.secure_channel(hostport, with_cert), "TLS with a client certificate")

without = grpc.secure_channel(hostport, grpc.ssl_channel_credentials(read(ca)))
try:
    snapd_pb2_grpc.SnapdStub(without).ListVms(snapd_pb2.ListVmsRequest(), timeout=10)
    raise AssertionError("ListVms without a client certificate was answered")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED, (e.code(), e.details())
    print(f"TLS without a client certificate: {e.code().name}: {e.details()}")
