"""The OpenSSH peer of the SSH tests (tests/peers/sshd.py) checked on its
own, with the OpenSSH client and paramiko, no agent involved: if these fail,
an SSH proxy test's failure (or refusal) would prove nothing about the agent.
Also checks that the asciicast player the recording tests use runs."""
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import paramiko
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "peers"))
from sshd import Sshd, keygen, public_line, ssh_cmd  # noqa: E402


@pytest.fixture(scope="module")
def sshd():
    with Sshd() as s:
        yield s


@pytest.fixture
def known_hosts(sshd, tmp_path):
    return sshd.write_known_hosts(tmp_path / "known_hosts")


def run(argv, timeout=30, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)


def connect(sshd, known_hosts, **kw) -> paramiko.SSHClient:
    """A paramiko client that knows only the host keys in `known_hosts`
    (RejectPolicy, paramiko's default, refuses any other)."""
    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    kw.setdefault("username", sshd.user)
    if "password" not in kw:
        kw.setdefault("key_filename", str(sshd.client_key))
    client.connect("127.0.0.1", sshd.port, look_for_keys=False, allow_agent=False, timeout=10, **kw)
    return client


def exec_(client: paramiko.SSHClient, command: str, timeout=30) -> tuple[int, str, str]:
    _, out, err = client.exec_command(command, timeout=timeout)
    stdout, stderr = out.read().decode(), err.read().decode()
    return out.channel.recv_exit_status(), stdout, stderr


def test_known_hosts_lines_are_the_servers_keys(sshd):
    lines = sshd.known_hosts_line().splitlines()
    assert [l.split()[:2] for l in lines] == [[f"[127.0.0.1]:{sshd.port}", "ssh-ed25519"],
                                               [f"[127.0.0.1]:{sshd.port}", "ssh-rsa"]]
    assert [l.split(" ", 1)[1] for l in lines] == sshd.host_key_lines()
    # Not the machine's own host keys.
    system = {public_line(p) for p in Path("/etc/ssh").glob("ssh_host_*_key.pub")}
    assert not system & set(sshd.host_key_lines())
    # What the server presents is what the lines say: ssh-keyscan asks for each type.
    scanned = run(["ssh-keyscan", "-p", str(sshd.port), "-t", "ed25519,rsa", "127.0.0.1"])
    assert sorted(l for l in scanned.stdout.splitlines() if not l.startswith("#")) == sorted(lines), scanned.stderr


def test_openssh_exec_returns_output_and_exit_status(sshd, known_hosts):
    r = run(ssh_cmd(sshd.port, "echo out; echo err >&2; id -un; exit 3", key=sshd.client_key, known_hosts=known_hosts))
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\nroot\n", "err\n"), sshd.log()
    assert "Accepted publickey for root from 127.0.0.1" in sshd.log()


def test_openssh_refuses_a_wrong_known_hosts(sshd, tmp_path):
    """A known_hosts with another key for [127.0.0.1]:PORT: the client must stop before logging in."""
    other = keygen(tmp_path / "other_host_key", "ed25519")
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"[127.0.0.1]:{sshd.port} {public_line(f'{other}.pub')}\n")
    r = run(ssh_cmd(sshd.port, "echo", "should-not-run", key=sshd.client_key, known_hosts=wrong,
                    extra_opts={"HostKeyAlgorithms": "ssh-ed25519"}))
    assert r.returncode == 255 and "should-not-run" not in r.stdout, (r.stdout, r.stderr)
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in r.stderr and "Host key verification failed." in r.stderr, r.stderr

    # No line at all for the host: refused too (StrictHostKeyChecking=yes).
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    r = run(ssh_cmd(sshd.port, "true", key=sshd.client_key, known_hosts=empty))
    assert r.returncode == 255 and "Host key verification failed." in r.stderr, r.stderr


def test_openssh_refuses_an_unauthorized_key_until_added(sshd, known_hosts, tmp_path):
    key = keygen(tmp_path / "newcomer", "ed25519")
    r = run(ssh_cmd(sshd.port, "echo", "in", key=key, known_hosts=known_hosts))
    assert r.returncode == 255 and "Permission denied" in r.stderr, (r.stdout, r.stderr)
    sshd.add_authorized_key(Path(f"{key}.pub").read_text())
    r = run(ssh_cmd(sshd.port, "echo", "in", key=key, known_hosts=known_hosts))
    assert (r.returncode, r.stdout) == (0, "in\n"), r.stderr


def test_paramiko_exec_with_key_and_known_hosts(sshd, known_hosts):
    client = connect(sshd, known_hosts)
    try:
        assert exec_(client, "echo paramiko; echo oops >&2; exit 5") == (5, "paramiko\n", "oops\n")
        key = client.get_transport().get_remote_server_key()
        assert f"{key.get_name()} {key.get_base64()}" in sshd.host_key_lines()
    finally:
        client.close()


def test_paramiko_refuses_a_wrong_known_hosts(sshd, tmp_path):
    other = keygen(tmp_path / "other_host_key", "ed25519")
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"[127.0.0.1]:{sshd.port} {public_line(f'{other}.pub')}\n")
    with pytest.raises(paramiko.BadHostKeyException):
        connect(sshd, wrong, disabled_algorithms={"keys": ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"]}).close()
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        connect(sshd, empty).close()


def test_paramiko_password_login(sshd, known_hosts):
    client = connect(sshd, known_hosts, username=sshd.password_user, password=sshd.password)
    try:
        assert exec_(client, "id -un") == (0, f"{sshd.password_user}\n", "")
    finally:
        client.close()
    assert f"Accepted password for {sshd.password_user} from 127.0.0.1" in sshd.log()
    with pytest.raises(paramiko.AuthenticationException):
        connect(sshd, known_hosts, username=sshd.password_user, password="not-the-password").close()


def test_sftp_put_get_5_mb_intact(sshd, known_hosts, tmp_path):
    data = os.urandom(5 * 1024 * 1024)
    local, back = tmp_path / "up.bin", tmp_path / "down.bin"
    local.write_bytes(data)
    remote = sshd.dir / "sftp-upload.bin"  # the server's disk is this machine's
    client = connect(sshd, known_hosts)
    try:
        sftp = client.open_sftp()
        attrs = sftp.put(str(local), str(remote))
        assert attrs.st_size == len(data)
        sftp.get(str(remote), str(back))
        sftp.close()
    finally:
        client.close()
        digest = hashlib.sha256(data).hexdigest()
    assert hashlib.sha256(remote.read_bytes()).hexdigest() == digest
    assert hashlib.sha256(back.read_bytes()).hexdigest() == digest


def read_until(chan: paramiko.Channel, marker: bytes, timeout: float = 15) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    chan.settimeout(0.2)
    while marker not in buf:
        if time.monotonic() > deadline:
            raise AssertionError(f"no {marker!r} from the shell within {timeout} s; got {buf!r}")
        try:
            chunk = chan.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            raise AssertionError(f"the shell closed before {marker!r}; got {buf!r}")
        buf += chunk
    return buf


def test_interactive_shell_with_a_pty(sshd, known_hosts):
    client = connect(sshd, known_hosts)
    try:
        chan = client.invoke_shell(term="xterm", width=91, height=27)
        # The shell computes the marker, so the terminal's echo of the typed line does not contain it.
        chan.sendall(b"tty; stty size; echo MARK$((6*7))END\n")
        out = read_until(chan, b"MARK42END")
        assert b"/dev/pts/" in out and b"27 91" in out, out
        chan.sendall(b"exit 7\n")
        assert chan.recv_exit_status() == 7
    finally:
        client.close()


def test_asciinema_cat_plays_a_v2_cast(tmp_path):
    player = Path(sys.executable).parent / "asciinema"
    assert player.exists(), f"{player}: pip install -r tests/requirements.txt"
    assert run([str(player), "--version"]).stdout.strip() == "asciinema 2.4.0"
    cast = tmp_path / "session.cast"
    header = {"version": 2, "width": 80, "height": 24, "timestamp": 1700000000, "env": {"TERM": "xterm"}}
    events = [[0.1, "o", "hello "], [0.25, "i", "typed\r"], [0.3, "o", "from the cast\r\n"], [0.5, "o", "$ "]]
    cast.write_text("\n".join(json.dumps(x) for x in [header, *events]) + "\n")
    # Bytes: text mode would turn the recorded "\r\n" into "\n".
    r = subprocess.run([str(player), "cat", str(cast)], capture_output=True, timeout=30)
    assert (r.returncode, r.stdout) == (0, b"hello from the cast\r\n$ "), r.stderr
