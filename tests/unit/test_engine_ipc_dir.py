"""Where vLLM's ZMQ sockets go: a directory of this process's own, removed when its last engine
stops; a path the user set is left to the user."""

from __future__ import annotations

import tempfile

import pytest

from services.rollout import engine as eng


@pytest.fixture
def temp(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("VLLM_RPC_BASE_PATH", raising=False)
    monkeypatch.delenv(eng._OURS, raising=False)
    return tmp_path


def test_own_dir_for_the_engines_of_a_process_removed_after_the_last(temp, monkeypatch):
    ipc = eng._IpcDir()
    ipc.acquire()
    path = ipc.path
    assert path.parent == temp and path.name.startswith(eng.IPC_PREFIX) and path.is_dir()
    assert eng.os.environ["VLLM_RPC_BASE_PATH"] == str(path)
    ipc.acquire()  # a second engine in the same process shares it
    assert ipc.path == path
    (path / "sock").write_bytes(b"")  # what vLLM leaves
    ipc.release()
    assert path.is_dir()  # one engine still running
    ipc.release()
    assert not path.exists() and "VLLM_RPC_BASE_PATH" not in eng.os.environ


def test_the_users_path_is_used_and_kept(temp, monkeypatch):
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(temp))
    ipc = eng._IpcDir()
    ipc.acquire()
    ipc.release()
    assert ipc.path is None and temp.is_dir()
    assert eng.os.environ["VLLM_RPC_BASE_PATH"] == str(temp)


def test_a_path_inherited_from_a_loraloop_parent_is_not_reused(temp, monkeypatch):
    parents = temp / "parent-dir"
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(parents))
    monkeypatch.setenv(eng._OURS, str(parents))
    ipc = eng._IpcDir()
    ipc.acquire()
    assert ipc.path != parents and eng.os.environ["VLLM_RPC_BASE_PATH"] == str(ipc.path)
    ipc.release()
