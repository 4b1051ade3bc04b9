"""Unix sockets go around the TCP hooks, so `warden run` keeps PostgreSQL's
out of the program's reach: its usual places always, others given with
--hide-path. The program still reaches the server over TCP, through the
agent."""
import os
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "peers"))
from pg import PostgresServer  # noqa: E402

from conftest import WARDEN, read_requests, warden_run  # noqa: E402


@pytest.fixture(scope="module")
def pg():
    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture
def tmp_socket():
    """A unix socket where some PostgreSQL builds put theirs, answering 'hi'."""
    path = Path(f"/tmp/.s.PGSQL.{40000 + os.getpid() % 20000}")
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen()

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.sendall(b"hi")
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield path
    listener.close()
    path.unlink(missing_ok=True)


REACH = textwrap.dedent("""
    import json, socket, sys
    out = {}
    for path in sys.argv[1:]:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            out[path] = s.recv(2).decode()
        except OSError as e:
            out[path] = type(e).__name__
        finally:
            s.close()
    print(json.dumps(out))
""")


def test_postgres_sockets_in_tmp_are_out_of_reach(tmp_socket, audit_dir):
    # Outside Warden the socket answers.
    direct = subprocess.run([sys.executable, "-c", REACH, str(tmp_socket)], capture_output=True, text=True)
    assert direct.stdout.strip() == f'{{"{tmp_socket}": "hi"}}'
    proc = subprocess.run([WARDEN, "run", "--audit-dir", str(audit_dir), "--", sys.executable, "-c", REACH,
                           str(tmp_socket)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f'{{"{tmp_socket}": "ConnectionRefusedError"}}'
    # The program's namespace covered it, not the host's: it still answers here.
    again = subprocess.run([sys.executable, "-c", REACH, str(tmp_socket)], capture_output=True, text=True)
    assert again.stdout.strip() == direct.stdout.strip()


def test_hide_path_covers_a_socket_directory_and_tcp_still_works(pg, audit_dir):
    code = textwrap.dedent(f"""
        import json, psycopg
        out = {{}}
        try:
            psycopg.connect("host={pg.dir} port={pg.port} dbname={pg.database} user={pg.user} password={pg.password}").close()
            out["unix"] = "connected"
        except psycopg.OperationalError as e:
            out["unix"] = "refused" if "No such file or directory" in str(e) else str(e)
        with psycopg.connect({pg.dsn!r}, autocommit=True) as conn:
            out["tcp"] = conn.execute("SELECT 7").fetchone()[0]
        print(json.dumps(out))
    """)
    run = warden_run(code, audit_dir, "--hide-path", str(pg.dir))
    assert run.returncode == 0, run.stderr
    assert run.report == {"unix": "refused", "tcp": 7}
    assert [r["statement"] for r in read_requests(audit_dir)] == ["SELECT 7"]
    # Without --hide-path the same program reaches the server around the agent.
    run = warden_run(code, audit_dir)
    assert run.report == {"unix": "connected", "tcp": 7}, run.stderr


def test_a_hide_path_that_does_not_exist_is_an_error(audit_dir, tmp_path):
    missing = tmp_path / "no-such-dir"
    proc = subprocess.run([WARDEN, "run", "--audit-dir", str(audit_dir), "--hide-path", str(missing), "--", "true"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 125
    assert f"--hide-path {missing}: no such file or directory" in proc.stderr
