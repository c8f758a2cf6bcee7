"""Background CLI runs with real subprocesses: progress parsing, failure messages, cancel kills the process tree."""

import os
import sys
import textwrap
import time

import pytest

from CLIPSegLib.slicer.background import BackgroundRun, parse_event, segment_command


def test_parse_event_accepts_only_json_events():
    assert parse_event('{"event": "progress", "stage": "s", "done": 1, "total": 4}\n')["done"] == 1
    assert parse_event("some log line") is None
    assert parse_event('{"no_event": 1}') is None
    assert parse_event("{broken") is None


def _script(tmp_path, body):
    p = tmp_path / "child.py"
    p.write_text(textwrap.dedent(body))
    return [sys.executable, str(p)]


def test_progress_messages_and_done_are_collected(tmp_path):
    argv = _script(tmp_path, """
        import json
        print("warming up")
        for i in range(1, 4):
            print(json.dumps({"event": "progress", "stage": "segmenting slices", "done": i, "total": 3}), flush=True)
        print(json.dumps({"event": "message", "text": "'cyst': found"}), flush=True)
        print(json.dumps({"event": "done", "output": "x.seg.nrrd"}), flush=True)
    """)
    run = BackgroundRun(argv)
    assert run.wait(30) == 0
    assert (run.state.stage, run.state.done, run.state.total) == ("segmenting slices", 3, 3)
    assert run.state.messages == ["'cyst': found"] and run.state.result["output"] == "x.seg.nrrd"


def test_failing_cli_surfaces_its_own_message(tmp_path):
    argv = segment_command(tmp_path / "missing.nrrd", ["cyst"], tmp_path / "o.seg.nrrd", device="cpu")
    run = BackgroundRun(argv, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert run.wait(120) == 2
    assert "does not exist" in run.error_text()
    assert not (tmp_path / "o.seg.nrrd").exists()


def test_cancel_kills_the_whole_process_tree(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    argv = _script(tmp_path, f"""
        import json, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        open({str(pidfile)!r}, "w").write(str(child.pid))
        for i in range(300):
            print(json.dumps({{"event": "progress", "stage": "work", "done": i, "total": 300}}), flush=True)
            time.sleep(0.1)
    """)
    run = BackgroundRun(argv)
    deadline = time.time() + 30
    while not (pidfile.exists() and pidfile.read_text(encoding="utf-8")) and time.time() < deadline:
        time.sleep(0.05)
    grandchild = int(pidfile.read_text(encoding="utf-8"))
    run.cancel(grace=2)
    assert run.returncode is not None and run.cancelled
    for _ in range(50):
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild process {grandchild} survived cancel")


class _Popen:
    """Records how a process would be started; never starts one."""

    calls = []

    def __init__(self, argv, **kwargs):
        import io

        _Popen.calls.append(kwargs)
        self.stdout, self.stderr, self.pid = io.StringIO(""), io.StringIO(""), 0

    def poll(self):
        return 0


def test_on_windows_no_console_window_flashes_up(monkeypatch):
    import subprocess

    from CLIPSegLib.slicer import background

    _Popen.calls = []
    monkeypatch.setattr(subprocess, "Popen", _Popen)
    for name in ("nt", "posix"):  # a copy of os for the module under test: pytest itself keeps the real one
        fake_os = type(os)("os")
        fake_os.__dict__.update(vars(os), name=name)
        monkeypatch.setattr(background, "os", fake_os)
        BackgroundRun(["PythonSlicer", "-m", "CLIPSegLib.cli"])
    windows, posix = _Popen.calls
    assert windows["creationflags"] == 0x00000200 | 0x08000000  # CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW
    assert "start_new_session" not in windows
    assert posix["start_new_session"] is True and "creationflags" not in posix


def test_the_device_probe_reports_what_torch_sees():
    import torch

    from CLIPSegLib.slicer.background import device_probe_command

    run = BackgroundRun(device_probe_command())
    assert run.wait(120) == 0, run.error_text()
    assert run.state.result["cuda"] == torch.cuda.is_available()
    assert isinstance(run.state.result["name"], str)
