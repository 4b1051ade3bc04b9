"""SSH through the agent versus direct, side by side in one run: the part of
`cargo xtask bench` that measures the SSH relay.

Through the agent every connection is two SSH sessions (the program's,
ended by the agent, and the agent's own to the server), each exec is
decided and audited, and its output recorded. The client is paramiko in a
separate process, under `warden run` or not, timing on its own clock:
- exec: sequential `true` commands on one connection, p50 and p99 per
  command and commands per second;
- connect: a new connection, login and one exec, p50;
- sftp: a file put and got back, MiB/s each way.
The real sshd runs on loopback (tests/peers/sshd.py)."""
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "peers"))
from sshd import Sshd  # noqa: E402

WARDEN = os.environ["WARDEN_BIN"]
EXECS = int(os.environ.get("SSH_BENCH_EXECS", "300"))
CONNECTS = int(os.environ.get("SSH_BENCH_CONNECTS", "30"))
MIB = int(os.environ.get("SSH_BENCH_MIB", "64"))

CLIENT = textwrap.dedent("""
    import json, os, sys, time, paramiko
    port, key, known, blob, execs, connects = sys.argv[1:7]
    # Under `warden run`: the agent's host key, from the file it names.
    known = os.environ.get("WARDEN_SSH_KNOWN_HOSTS", known)
    def connect():
        c = paramiko.SSHClient()
        c.load_host_keys(known)
        c.connect("127.0.0.1", int(port), username="root", key_filename=key, look_for_keys=False, allow_agent=False)
        return c
    def run(c, cmd):
        _, out, _ = c.exec_command(cmd)
        out.read()
        return out.channel.recv_exit_status()
    c = connect()
    run(c, "true")
    lat = []
    start = time.perf_counter()
    for _ in range(int(execs)):
        t = time.perf_counter()
        run(c, "true")
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    sftp = c.open_sftp()
    t = time.perf_counter(); sftp.put(blob, blob + ".up"); put = time.perf_counter() - t
    t = time.perf_counter(); sftp.get(blob + ".up", blob + ".down"); get = time.perf_counter() - t
    sftp.close(); c.close()
    conn = []
    for _ in range(int(connects)):
        t = time.perf_counter()
        c = connect(); run(c, "true"); c.close()
        conn.append(time.perf_counter() - t)
    lat.sort(); conn.sort()
    print(json.dumps(dict(rate=int(execs) / wall, p50=lat[len(lat) // 2], p99=lat[int(len(lat) * 0.99)],
                          connect=conn[len(conn) // 2], put=os.path.getsize(blob) / put, get=os.path.getsize(blob) / get)))
""")


def measure(prefix: list, sshd: Sshd, key: str, known: str, blob: str) -> dict:
    out = subprocess.run(prefix + [sys.executable, "-c", CLIENT, str(sshd.port), key, known, blob, str(EXECS),
                                   str(CONNECTS)], capture_output=True, text=True,
                         env=dict(os.environ, WARDEN_LOG="warden=warn"))
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"the SSH bench client failed:\n{out.stdout}{out.stderr}")
    return json.loads(lines[-1])


def main():
    with Sshd(password_user=False) as sshd, tempfile.TemporaryDirectory(prefix="warden-ssh-bench-") as tmp:
        blob = Path(tmp) / "blob"
        blob.write_bytes(os.urandom(MIB << 20))
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(textwrap.dedent(f"""\
            version: 1
            targets:
              box: {{ address: 127.0.0.1, port: {sshd.port}, protocol: ssh, host_keys: {json.dumps(sshd.host_key_lines())} }}
            credentials:
              box: {{ user: root, private_key_file: {sshd.client_key} }}
            """))
        direct = measure([], sshd, str(sshd.client_key), str(sshd.known_hosts), str(blob))
        agent = measure([WARDEN, "run", "--audit-dir", str(Path(tmp) / "audit"), "--policy", str(policy), "--"],
                        sshd, str(sshd.client_key), str(sshd.known_hosts), str(blob))
        print(f"\nSSH (paramiko, sshd on loopback, {EXECS} execs, {CONNECTS} connections, {MIB} MiB sftp), "
              "direct versus through the agent")
        print(f"{'figure':<28} {'direct':>10} {'agent':>10} {'ratio':>6}")
        rows = [
            ("exec, commands/s", "rate", 1),
            ("exec p50, ms", "p50", 1000),
            ("exec p99, ms", "p99", 1000),
            ("connect+login+exec p50, ms", "connect", 1000),
            ("sftp put, MiB/s", "put", 1 / (1 << 20)),
            ("sftp get, MiB/s", "get", 1 / (1 << 20)),
        ]
        for name, key, scale in rows:
            d, a = direct[key] * scale, agent[key] * scale
            print(f"{name:<28} {d:>10.2f} {a:>10.2f} {a / d:>6.2f}")


if __name__ == "__main__":
    main()
