//! End-to-end tests of snapd: the real daemon on a temporary socket, driven through the generated client.
