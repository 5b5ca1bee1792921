"""What one request to a pinned peer costs in TLS, with and without what the peer
client keeps between requests (issue 20): its client context (built once per identity
and pinned peer) and the last TLS session (resumed). Real TLS on loopback, mutual
certificates pinned both ways, the product's own server (transport.http.TLSHTTPServer)
and client (transport.client.PeerClient) in this process, so the CPU time is both
sides'.

    python bench/bench_handshake.py [--requests 300]

Prints ``handshake_full_cpu_ms=… handshake_resumed_cpu_ms=… ratio=…`` (CPU and wall
time per request, medians of 3 runs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from vmreplica.transport import http as vhttp  # noqa: E402
from vmreplica.transport import tls  # noqa: E402
from vmreplica.transport.client import PeerClient  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=300)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vmr-bench-tls-"))

    def identity(name: str):
        key, crt = work / f"{name}.key", work / f"{name}.crt"
        fp = tls.generate_identity(name, key, crt)
        return key, crt, crt.read_text(), fp
    b_key, b_crt, b_pem, b_fp = identity("site-b")
    a_key, a_crt, a_pem, _ = identity("site-a")
    router = vhttp.Router()
    router.add("GET", "/v1/ping", lambda req: {"peer": req.peer_fingerprint})
    server_ctx = tls.server_context(b_crt, b_key, [a_pem])
    server = vhttp.TLSHTTPServer(("127.0.0.1", 0), router, lambda: server_ctx)
    vhttp.serve_in_thread(server, "bench-tls")
    port = server.server_address[1]

    def run(keep: bool) -> tuple[float, float]:
        cpu, wall = time.process_time(), time.monotonic()
        for _ in range(args.requests):
            if not keep:             # what every request paid before issue 20
                tls.forget_kept()
            PeerClient("127.0.0.1", port, a_crt, a_key, b_pem, b_fp).request("GET", "/v1/ping")
        n = args.requests
        return (time.process_time() - cpu) / n * 1000, (time.monotonic() - wall) / n * 1000

    run(True)                                                   # warm up
    full = [run(False) for _ in range(3)]
    kept = [run(True) for _ in range(3)]
    server.shutdown()
    f_cpu, f_wall = statistics.median(c for c, _ in full), statistics.median(w for _, w in full)
    k_cpu, k_wall = statistics.median(c for c, _ in kept), statistics.median(w for _, w in kept)
    print(f"handshake_full_cpu_ms={f_cpu:.2f} handshake_resumed_cpu_ms={k_cpu:.2f} "
          f"ratio={f_cpu / k_cpu:.2f} full_wall_ms={f_wall:.2f} resumed_wall_ms={k_wall:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
