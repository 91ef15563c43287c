#!/usr/bin/env python3
"""What scraping snapd's metrics costs under load (README, "snapd under load").

Runs `snapctl bench --clients 8` against a fresh release snapd with --metrics, alternating runs
without a scraper and with one scraping /metrics every 100 ms (150 times Prometheus's default
rate), and reports per run: bench calls/s, snapd CPU seconds per second of bench (utime+stime
from /proc/<pid>/stat), and the scrape latency p50/p99 (HTTP GET to the whole body read).

Usage: tools/scrape-cost.py [ROUNDS] [SECONDS]   (after cargo build --release -p snapd --bins)
       tools/scrape-cost.py idle                 (snapd CPU per scrape, idle daemon)
"""
import json, os, shutil, socket, statistics, subprocess, sys, tempfile, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNAPD = os.path.join(ROOT, "target/release/snapd")
SNAPCTL = os.path.join(ROOT, "target/release/snapctl")
TICK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def scrape(port):
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        n = 0
        while True:
            b = s.recv(65536)
            if not b:
                break
            n += len(b)
    return time.perf_counter() - t, n


def run(scraping, seconds):
    d = tempfile.mkdtemp(prefix="scrape-cost-")
    port = free_port()
    sock = os.path.join(d, "snapd.sock")
    log = open(os.path.join(d, "log"), "w")
    p = subprocess.Popen([SNAPD, "--data-dir", os.path.join(d, "data"), "--socket", sock,
                          "--metrics", f"127.0.0.1:{port}"], stderr=log)
    for _ in range(200):
        if os.path.exists(sock):
            break
        time.sleep(0.05)
    latencies, sizes, stop = [], [], threading.Event()

    def scraper():
        while not stop.is_set():
            took, n = scrape(port)
            latencies.append(took)
            sizes.append(n)
            stop.wait(0.1)

    cpu0, t0 = cpu_seconds(p.pid), time.time()
    th = threading.Thread(target=scraper) if scraping else None
    if th:
        th.start()
    out = subprocess.run([SNAPCTL, "--socket", sock, "--json", "bench", "--clients", "8",
                          "--duration-secs", str(seconds)], capture_output=True, text=True, check=True)
    stop.set()
    if th:
        th.join()
    cpu = (cpu_seconds(p.pid) - cpu0) / (time.time() - t0)
    p.terminate()
    p.wait()
    shutil.rmtree(d, ignore_errors=True)
    bench = json.loads(out.stdout)
    calls = sum(c["ok"] for c in bench["calls"].values()) / bench["duration_secs"]
    r = {"scraping": scraping, "calls_per_s": calls, "snapd_cpu": cpu}
    if latencies:
        latencies.sort()
        r.update(scrapes=len(latencies), p50_ms=1000 * statistics.median(latencies),
                 p99_ms=1000 * latencies[int(0.99 * (len(latencies) - 1))], bytes=max(sizes))
    return r


def idle(scrapes=1000):
    """CPU per scrape of an idle daemon (no VM runs, so its CPU is the scrapes'), and latency."""
    d = tempfile.mkdtemp(prefix="scrape-cost-")
    port = free_port()
    sock = os.path.join(d, "snapd.sock")
    p = subprocess.Popen([SNAPD, "--data-dir", os.path.join(d, "data"), "--socket", sock,
                          "--metrics", f"127.0.0.1:{port}"], stderr=subprocess.DEVNULL)
    for _ in range(200):
        if os.path.exists(sock):
            break
        time.sleep(0.05)
    scrape(port)
    cpu0, t0 = cpu_seconds(p.pid), time.time()
    lat = sorted(scrape(port)[0] for _ in range(scrapes))
    cpu, wall = cpu_seconds(p.pid) - cpu0, time.time() - t0
    # Subtract the daemon's own idle CPU over the same time (its 100 ms housekeeping).
    time.sleep(wall)
    base = cpu_seconds(p.pid) - cpu0 - cpu
    p.terminate()
    p.wait()
    shutil.rmtree(d, ignore_errors=True)
    print(f"idle daemon, {scrapes} scrapes back to back: {1000 * (cpu - base) / scrapes:.3f} ms of snapd CPU "
          f"per scrape ({1000 * cpu / scrapes:.3f} ms before subtracting {base:.3f} s of idle CPU), "
          f"latency p50 {1000 * statistics.median(lat):.3f} ms, p99 {1000 * lat[int(0.99 * (len(lat) - 1))]:.3f} ms")


def main():
    if sys.argv[1:2] == ["idle"]:
        idle()
        return
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    seconds = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    results = []
    for i in range(rounds):
        for scraping in (False, True):
            r = run(scraping, seconds)
            print(json.dumps(r), flush=True)
            results.append(r)
    for scraping in (False, True):
        rs = [r for r in results if r["scraping"] == scraping]
        print(f"{'scraped every 100 ms' if scraping else 'not scraped':>22}: "
              f"calls/s median {statistics.median(r['calls_per_s'] for r in rs):.1f}, "
              f"snapd CPU median {statistics.median(r['snapd_cpu'] for r in rs):.3f} s/s"
              + (f", scrape p50 median {statistics.median(r['p50_ms'] for r in rs):.2f} ms, "
                 f"p99 median {statistics.median(r['p99_ms'] for r in rs):.2f} ms, "
                 f"{max(r['bytes'] for r in rs)} bytes" if scraping else ""))


main()
