"""PostgreSQL through the agent versus direct, with the real pgbench, side by
side in one run: the part of `cargo xtask bench` that measures the decoder.

Every statement through the agent is decoded, classified, checked against
the policy and audited, so this is the cost of all of that per statement."""
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "peers"))
from pg import PostgresServer, _bin  # noqa: E402

WARDEN = os.environ["WARDEN_BIN"]
SECONDS = os.environ.get("PGBENCH_SECONDS", "10")


def tps(server: PostgresServer, prefix: list, mode: list) -> float:
    args = ["-h", "127.0.0.1", "-p", str(server.port), "-U", server.user, server.database]
    # The test server has no TLS, so direct pgbench runs in plaintext; through
    # the agent a client that asks for TLS gets it (the agent ends it). Both
    # sides run in plaintext here, to compare the same work.
    env = dict(os.environ, PGPASSWORD=server.password, PGSSLMODE="disable", WARDEN_LOG="warden=warn")
    out = subprocess.run(prefix + [_bin("pgbench"), *mode, "-T", SECONDS, "-c", "4", "-j", "2", *args],
                         env=env, capture_output=True, text=True)
    m = re.search(r"tps = ([\d.]+) \(without initial", out.stdout)
    if not m:
        raise SystemExit(f"pgbench failed: {out.stdout}{out.stderr}")
    return float(m.group(1))


def main():
    server = PostgresServer()
    try:
        env = dict(os.environ, PGPASSWORD=server.password)
        subprocess.run([_bin("pgbench"), "-i", "-s", "2", "-q", "-h", "127.0.0.1", "-p", str(server.port),
                        "-U", server.user, server.database], env=env, check=True, capture_output=True)
        audit = tempfile.mkdtemp(prefix="warden-pgbench-audit-")
        through = [WARDEN, "run", "--audit-dir", audit, "--"]
        print(f"\nPostgreSQL (pgbench, {SECONDS} s, 4 clients), direct versus through the agent")
        print(f"{'workload':<24} {'direct tps':>12} {'agent tps':>12} {'ratio':>8}")
        for name, mode in [("select-only, simple", ["-S"]), ("select-only, extended", ["-S", "-M", "extended"]),
                           ("tpcb-like", [])]:
            direct = tps(server, [], mode)
            agent = tps(server, through, mode)
            print(f"{name:<24} {direct:>12.1f} {agent:>12.1f} {agent / direct:>8.2f}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
