"""Run the ``clipseg`` CLI in a background process: JSON-lines progress, cancel that kills the whole process tree.

The Slicer panel polls ``BackgroundRun.poll()`` from a timer, so the UI never blocks; an out-of-memory crash kills the
child, not Slicer. The child runs in its own process group (POSIX) so ``cancel()`` reaches its workers too.
``BackgroundJob`` is a run on files in its own temporary folder (segmentation: ``scene_run.SceneRun``; fine-tuning:
``train_run.TrainRun``): the folder is removed whether the run succeeds, fails or is cancelled.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import Cancelled, ClipSegError
from ..options import SegmentOptions

LIB_PARENT = str(Path(__file__).resolve().parents[2])  # the folder holding CLIPSegLib/


def child_environment(device: str = "auto") -> dict:
    """Environment for the child: CLIPSegLib importable; CPU-only hides GPUs entirely."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([LIB_PARENT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = "-1"
    return env


def parse_event(line: str) -> dict | None:
    """One stdout line -> event dict (``{"event": "progress"|"message"|"done"|"error", ...}``) or None if not JSON."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


def cli_command(name: str, python: str | None = None) -> list[str]:
    """The start of every background argv: ``python -m CLIPSegLib.cli NAME`` (``python``: PythonSlicer in Slicer)."""
    return [python or sys.executable, "-m", "CLIPSegLib.cli", name]


def segment_command(input_path, prompts, output_path, options: SegmentOptions | None = None, *, probabilities=None,
                    python: str | None = None, **keywords) -> list[str]:
    """argv for ``python -m CLIPSegLib.cli segment ... --progress json`` (``python``: PythonSlicer in Slicer).

    ``options`` (default: all defaults) with ``keywords`` changed (any ``SegmentOptions`` field) become the command's
    flags (``SegmentOptions.to_argv``); ``probabilities`` names the file the probabilities are written to."""
    options = SegmentOptions.from_keywords(options, **keywords)
    cmd = cli_command("segment", python) + [str(input_path), "--output", str(output_path), *options.to_argv(),
                                            "--progress", "json"]
    for p in prompts:
        cmd += ["--prompt", p]
    if probabilities:
        cmd += ["--probabilities", str(probabilities)]
    return cmd


def finetune_command(data, output_dir, model_id: str, from_model=None, *, device: str = "auto", steps=None,
                     force: bool = False, python: str | None = None, input_size: int | None = None,
                     precision: str = "fp32") -> list[str]:
    """argv for ``python -m CLIPSegLib.cli finetune --data DATA.csv --output-dir DIR --model-id ID --progress json``
    plus the optional flags named like the keywords (from, device, precision, steps, input-size, force) when given;
    the command writes ``DIR/ID.json`` and ``DIR/ID.safetensors`` and ends with ``{"event": "done", "model": "<path
    of the .json>"}``.
    ``device`` "auto" and ``precision`` "fp32" are left to the command."""
    cmd = cli_command("finetune", python) + ["--data", str(data), "--output-dir", str(output_dir), "--model-id",
                                             model_id, "--progress", "json"]
    optional = {"from": from_model or None, "device": None if device == "auto" else device,
                "precision": None if precision == "fp32" else precision, "steps": steps, "input-size": input_size}
    for name, value in optional.items():
        if value is not None:
            cmd += [f"--{name}", str(value)]
    return cmd + (["--force"] if force else [])


# Windows process creation flags (values from the Win32 API; the subprocess constants exist only on Windows).
CREATE_NEW_PROCESS_GROUP = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x00000200)
CREATE_NO_WINDOW = getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000)


def process_group_options() -> dict:
    """Popen options: the child leads its own process group (so cancel reaches its workers); on Windows also no
    console window, which would otherwise flash up each time Slicer starts a run."""
    if os.name == "nt":
        return {"creationflags": CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW}
    return {"start_new_session": True}


# Run in the background process: the Slicer process itself never imports torch.
DEVICE_PROBE = ("import json, torch; cuda = torch.cuda.is_available(); print(json.dumps({'event': 'done', "
                "'cuda': cuda, 'name': torch.cuda.get_device_name(0) if cuda else ''}), flush=True)")


def device_probe_command(python: str | None = None) -> list[str]:
    """argv of a short child that reports ``{"event": "done", "cuda": bool, "name": GPU name or ""}``."""
    return [python or sys.executable, "-c", DEVICE_PROBE]


@dataclass
class RunState:
    stage: str = ""
    done: int = 0
    total: int = 0
    messages: list[str] = field(default_factory=list)
    error: str | None = None
    result: dict | None = None


class BackgroundRun:
    """A started child process. ``poll()`` returns new events; ``returncode`` is None while it runs."""

    def __init__(self, argv: list[str], env: dict | None = None, cwd: str | None = None):
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                                     env=env, cwd=cwd, **process_group_options())
        self.state = RunState()
        self._events: queue.Queue = queue.Queue()
        self._stderr: list[str] = []
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self._threads:
            t.start()
        self.cancelled = False

    def _read_stdout(self):
        for line in self.proc.stdout:
            event = parse_event(line)
            if event is not None:
                self._events.put(event)

    def _read_stderr(self):
        for line in self.proc.stderr:
            self._stderr.append(line)

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def poll(self) -> list[dict]:
        """New events since the last call, also folded into ``self.state``."""
        events = []
        while True:
            try:
                e = self._events.get_nowait()
            except queue.Empty:
                break
            events.append(e)
            kind = e["event"]
            if kind == "progress":
                self.state.stage, self.state.done, self.state.total = e.get("stage", ""), e["done"], e["total"]
            elif kind == "message":
                self.state.messages.append(e["text"])
            elif kind == "error":
                self.state.error = e["message"]
            elif kind == "done":
                self.state.result = e
        return events

    def wait(self, timeout: float | None = None) -> int:
        code = self.proc.wait(timeout)
        for t in self._threads:
            t.join(timeout=5)
        self.poll()
        return code

    def error_text(self) -> str:
        """The user-facing reason for a failure: the CLI's error message, else the tail of stderr."""
        self.poll()
        if self.state.error:
            return self.state.error
        tail = "".join(self._stderr[-20:]).strip()
        return tail or f"the background process stopped with exit code {self.returncode}"

    def cancel(self, grace: float = 3.0) -> None:
        """Stop the process and everything it started (SIGTERM to the group, SIGKILL after ``grace`` seconds)."""
        if self.proc.poll() is not None:
            return
        self.cancelled = True
        if os.name == "posix":
            pgid = os.getpgid(self.proc.pid)
            os.killpg(pgid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(pgid, signal.SIGKILL)
                self.proc.wait()
            try:  # children that ignored SIGTERM and outlived the leader
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:  # pragma: no cover - Windows
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(self.proc.pid)], capture_output=True)
            self.proc.wait()


class BackgroundJob:
    """A background CLI run on files in its own temporary folder, for the Slicer side (no Qt needed).

    A subclass's ``start`` checks its input and calls ``_launch(prepare, device)``: ``prepare(folder)`` writes the
    inputs there and returns the argv. Then ``poll()`` while ``running``; ``finish()`` waits and returns
    ``_result()`` (read from the folder), or raises the CLI's own message; ``cancel()`` kills the process tree. The
    folder is removed in every case."""

    def __init__(self, python: str | None = None):
        self.python = python
        self.run: BackgroundRun | None = None
        self.tmp: Path | None = None
        self.notes: list[str] = []  # what the Slicer side did that the user should know

    def _launch(self, prepare, device: str = "auto"):
        self.tmp = Path(tempfile.mkdtemp(prefix="clipseg-"))
        try:
            self.run = BackgroundRun(prepare(self.tmp), env=child_environment(device))
        except BaseException:
            self.cleanup()
            raise
        return self

    @property
    def running(self) -> bool:
        return self.run is not None and self.run.returncode is None

    def poll(self) -> list[dict]:
        return self.run.poll() if self.run else []

    def cancel(self) -> None:
        if self.run is not None:
            self.run.cancel()
        self.cleanup()

    def finish(self, timeout: float | None = None):
        """Wait for the process, then return ``_result()``; raises ClipSegError with the CLI's own message when it
        failed, Cancelled after ``cancel``. If ``timeout`` (s) passes first, ``subprocess.TimeoutExpired`` is raised
        and the run goes on with its files intact: call ``finish`` again, or ``cancel``."""
        code = self.run.wait(timeout)
        try:
            if self.run.cancelled:
                raise Cancelled("cancelled; the scene was not changed")
            if code != 0:
                raise ClipSegError(self.run.error_text())
            return self._result()
        finally:
            self.cleanup()

    def _result(self):
        raise NotImplementedError

    @property
    def messages(self) -> list[str]:
        return (self.run.state.messages if self.run else []) + self.notes

    def cleanup(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
