"""Command-line errors: one clear line, non-zero exit, nothing created."""

from __future__ import annotations

import os

import pytest

from conftest import run_cli


def test_unknown_option() -> None:
    r = run_cli("lab", "up", "--bogus")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "unrecognized arguments: --bogus" in lines[0]


def test_unknown_command() -> None:
    r = run_cli("fly")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("rate", ["0", "abc", "999999"])
def test_bad_rate(rate: str) -> None:
    r = run_cli("lab", "migrate", "--rate", rate)
    assert r.returncode == 2 and "rate" in r.stderr


def test_bad_lab_name() -> None:
    r = run_cli("lab", "status", "--name", "Bad Name!")
    assert r.returncode == 1 and "invalid lab name" in r.stderr


def test_status_of_absent_lab() -> None:
    r = run_cli("lab", "status", "--name", "npabsent")
    assert r.returncode == 1 and "not up" in r.stderr


def test_not_root(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # The venv's interpreter lives under /root, which an unprivileged user cannot execute, so
    # the uid check is exercised in-process.
    from netpass import cli, netns

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cli.main(["lab", "up", "--name", "npnoroot"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "netpass: netpass needs root (network namespaces, taps and tc); run it with sudo"
    ]
    assert netns.list_names("npnoroot-") == []


def test_library_entry_point() -> None:
    import netpass
    from netpass import orchestrator

    assert netpass.migrate is orchestrator.migrate
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = netpass.nothing  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["agent", "--listen", "nonsense", "--tls-cert", "a", "--tls-key", "b", "--tls-ca", "c"],
         "expected HOST:PORT"),
        (["agent", "--listen", "127.0.0.1:7000", "--tls-cert", "/nonexistent.pem",
          "--tls-key", "b", "--tls-ca", "c"], "does not exist"),
        (["migrate", "--src-qmp", "a", "--dst-qmp", "b", "--uri", "tcp:x:1",
          "--src-agent", "10.0.0.1:7400"], "go together"),
        (["migrate", "--src-qmp", "a", "--dst-qmp", "b", "--uri", "tcp:x:1",
          "--src-agent", "10.0.0.1:7400", "--dst-agent", "10.0.0.2:7400"], "need --tls-cert"),
    ],
)  # fmt: skip
def test_agent_options_bad_input(args: list[str], message: str) -> None:
    r = run_cli(*args)
    assert r.returncode != 0 and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
