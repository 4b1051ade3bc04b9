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


class PgBouncer:
    """The pooler people put in front of PostgreSQL, as the yardstick the
    agent's cost is compared with: transaction pooling, the same loopback
    server, run as postgres (it refuses root)."""

    def __init__(self, server: PostgresServer):
        import pwd
        import socket
        import time

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = Path(tempfile.mkdtemp(prefix="warden-pgbouncer-"))
        (self.dir / "users.txt").write_text(f'"{server.user}" "{server.password}"\n')
        (self.dir / "pgbouncer.ini").write_text(
            f"[databases]\n{server.database} = host=127.0.0.1 port={server.port} dbname={server.database}\n"
            f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = scram-sha-256\nauth_file = {self.dir}/users.txt\npool_mode = transaction\n"
            "max_client_conn = 100\ndefault_pool_size = 8\n"
            f"logfile = {self.dir}/log\npidfile = {self.dir}/pid\n")
        owner = pwd.getpwnam("postgres")
        for f in [self.dir, *self.dir.iterdir()]:
            os.chown(f, owner.pw_uid, owner.pw_gid)
        self.proc = subprocess.Popen(["runuser", "-u", "postgres", "--", PGBOUNCER, str(self.dir / "pgbouncer.ini")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise SystemExit(f"pgbouncer did not start; see {self.dir}/log")

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


PGBOUNCER = "/usr/sbin/pgbouncer"


def run_pgbench(server: PostgresServer, prefix: list, mode: list, port: int | None = None) -> tuple[float, float, float]:
    """TPS, and per-transaction latency p50 and p99 in ms (from pgbench's log)."""
    args = ["-h", "127.0.0.1", "-p", str(port or server.port), "-U", server.user, server.database]
    # The test server has no TLS, so direct pgbench runs in plaintext; through
    # the agent a client that asks for TLS gets it (the agent ends it). Both
    # sides run in plaintext here, to compare the same work.
    env = dict(os.environ, PGPASSWORD=server.password, PGSSLMODE="disable", WARDEN_LOG="warden=warn")
    with tempfile.TemporaryDirectory(prefix="warden-pgbench-log-") as logs:
        out = subprocess.run(prefix + [_bin("pgbench"), *mode, "-T", SECONDS, "-c", "4", "-j", "2", "-l",
                                       f"--log-prefix={logs}/tx", *args],
                             env=env, capture_output=True, text=True)
        m = re.search(r"tps = ([\d.]+) \(without initial", out.stdout)
        if not m:
            raise SystemExit(f"pgbench failed: {out.stdout}{out.stderr}")
        latencies = sorted(int(line.split()[2]) for f in Path(logs).iterdir() for line in f.read_text().splitlines())
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] / 1000  # noqa: E731
    return float(m.group(1)), pick(0.50), pick(0.99)


def main():
    server = PostgresServer()
    pooler = None
    try:
        env = dict(os.environ, PGPASSWORD=server.password)
        subprocess.run([_bin("pgbench"), "-i", "-s", "2", "-q", "-h", "127.0.0.1", "-p", str(server.port),
                        "-U", server.user, server.database], env=env, check=True, capture_output=True)
        audit = tempfile.mkdtemp(prefix="warden-pgbench-audit-")
        # Masking off: a policy with no sql_mask. On: the embedded default,
        # whose detectors scan every text column (pgbench's filler columns too).
        no_mask = Path(audit) / "no-mask.yaml"
        no_mask.write_text("version: 1\n")
        pooler = PgBouncer(server) if Path(PGBOUNCER).exists() else None
        if pooler is None:
            print(f"{PGBOUNCER} is missing (cargo xtask setup installs it): no PgBouncer row")
        paths = [
            ("direct", [], None),
            ("agent, masking off", [WARDEN, "run", "--audit-dir", audit, "--policy", str(no_mask), "--"], None),
            ("agent, masking on", [WARDEN, "run", "--audit-dir", audit, "--"], None),
        ]
        if pooler:
            paths.append(("pgbouncer (txn)", [], pooler.port))
        print(f"\nPostgreSQL (pgbench, {SECONDS} s, 4 clients), direct versus through the agent")
        print(f"{'workload':<22} {'path':<20} {'tps':>9} {'ratio':>6} {'p50 ms':>8} {'p99 ms':>8}")
        for name, mode in [("select-only, simple", ["-S"]), ("select-only, extended", ["-S", "-M", "extended"]),
                           ("tpcb-like", [])]:
            direct = None
            for path, prefix, port in paths:
                tps, p50, p99 = run_pgbench(server, prefix, mode, port)
                direct = direct or tps
                print(f"{name:<22} {path:<20} {tps:>9.1f} {tps / direct:>6.2f} {p50:>8.3f} {p99:>8.3f}")
    finally:
        if pooler:
            pooler.stop()
        server.stop()


if __name__ == "__main__":
    main()
