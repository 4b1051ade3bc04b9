"""The demo (`cargo xtask demo`, the README's first command), run whole as
a user runs it: `python tests/demo/run_demo.py` with WARDEN_BIN set. It
checks every step itself and exits non-zero, saying why, when one does not
go as shown; this test makes sure it still exits 0 and still shows what
the README promises."""
import os
import subprocess
import sys
from pathlib import Path

from conftest import WARDEN

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "tests" / "demo" / "run_demo.py"


def test_the_demo_runs_and_shows_each_step(tmp_path):
    audit = tmp_path / "demo-audit"
    env = dict(os.environ, WARDEN_BIN=WARDEN, WARDEN_DEMO_AUDIT=str(audit))
    proc = subprocess.run([sys.executable, str(DEMO)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, f"--- stdout ---\n{out}\n--- stderr ---\n{proc.stderr}"
    # Every step, in order.
    headings = [line for line in out.splitlines() if line[:2] in {f"{n}." for n in range(1, 10)}]
    assert headings == [
        "1. A stand-in LLM provider",
        "2. The policy",
        "3. The support bot, under Warden",
        "4. The audit, read with DuckDB",
        "5. A policy that allows one model only",
        "6. A LangChain SQL agent and a real PostgreSQL",
        "7. The policy for the agent",
        "8. The SQL agent, under Warden",
        "9. The agent's statements in the audit, read with DuckDB",
    ], out
    # The support bot: the real key on every request, the other model refused.
    assert "and on every request the real key (sk-demo-...), which the bot never held." in out
    assert "The provider received nothing. The audit records each refused call:" in out
    # The SQL agent: the cards masked, the write refused by the rule, the table unchanged.
    assert "(1, 'Ada Lovelace', '**** **** **** 1111')," in out
    assert "4111 1111 1111 1111" in out  # in the owner's own view of the table, before and after
    assert 'permission denied by Warden policy rule "no-llm-writes"' in out
    assert "server itself (psql, not through Warden) the table is as it was:" in out
    assert "gave it [('support_bot',)]" in out
    # The audit's rows of the model's statements: class, decision, rule, sqlstate,
    # masked, db_user, caused_by_session_id (shortened), caused_by_seq, caused_by_match.
    step9 = out.split("\n9. ", 1)[1]
    rows = [line.split() for line in step9.splitlines() if line.startswith(("   SELECT id, name", "   UPDATE"))]
    assert [r[-8:-3] + r[-2:] for r in rows[:1]] == [["read", "allow", "default", "3", "support_bot", "1", "exact"]]
    assert [r[-9:-3] + r[-2:] for r in rows[1:]] == [
        ["write", "deny", "no-llm-writes", "42501", "0", "support_bot", "2", "exact"]]
    assert len({r[-3] for r in rows}) == 1 and rows[0][-3].startswith("..."), rows
    assert out.rstrip().splitlines()[-2].startswith("Done. The audit stays in ")
    # The audit went where the test asked, not into the checkout.
    assert list((audit / "requests").rglob("*.parquet")), list(audit.rglob("*"))
