"""Running model-written code: in a child process, with a timeout and resource limits.

Never ``exec`` a response in a role's process. ``run_python`` starts ``python -I`` in a fresh
session, in an empty temporary directory, with a scrubbed environment (no secrets, no
``PYTHONPATH``) and POSIX limits on address space, CPU time, file size and open files; on timeout
the whole process group is killed. Output is captured through files the size limit also caps.

This contains accidents and runaway code (loops, memory or disk bombs). It is not a jail: the child
runs as the same user and can reach the network; for hostile code add OS isolation (a container,
nsjail, gVisor) around the workers that call this.
"""

from __future__ import annotations

import os
import re
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass


@dataclass(frozen=True)
class SandboxResult:
    returncode: int  # negative: killed by that signal
    stdout: str
    stderr: str
    timed_out: bool

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _limits(memory_mb: int, cpu_s: int, file_mb: int, open_files: int):
    def apply() -> None:  # runs in the child, before python starts
        mem = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_mb * 1024 * 1024,) * 2)
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_python(code: str, *, stdin: str = "", timeout_s: float = 5.0, memory_mb: int = 512, cpu_s: int | None = None,
               file_mb: int = 4, open_files: int = 64, max_output_chars: int = 65536) -> SandboxResult:
    """Run ``code`` with ``python -I`` in a limited child process; never raises for what the code does."""
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    cpu = int(cpu_s if cpu_s is not None else max(1, round(timeout_s)) + 1)
    with tempfile.TemporaryDirectory(prefix="relaxrl-sandbox-") as tmp:
        out_path, err_path = os.path.join(tmp, ".stdout"), os.path.join(tmp, ".stderr")
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": tmp, "TMPDIR": tmp}
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", code], stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=tmp, env=env,
                start_new_session=True, preexec_fn=_limits(memory_mb, cpu, file_mb, open_files), close_fds=True,
            )
            timed_out = False
            try:
                proc.communicate(stdin.encode(), timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the child and anything it started
                except ProcessLookupError:
                    pass
                proc.wait()
        read = lambda p: open(p, "rb").read(max_output_chars).decode("utf-8", "replace")  # noqa: E731
        return SandboxResult(proc.returncode, read(out_path), read(err_path), timed_out)


_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


def python_tests(response: str, answer: str) -> float:
    """Verifier: 1.0 when the response's code (its first fenced block, or all of it) followed by the
    task's test code (``answer``, e.g. ``assert f(2) == 4``) runs to the end in the sandbox."""
    match = _FENCE.search(response)
    code = match.group(1) if match else response
    # Exit status 0 alone is not a pass: code that calls exit(0) before the tests run would score.
    # The tests print a fresh nonce last; only a run that gets there passes.
    nonce = secrets.token_hex(16)
    result = run_python(f"{code}\n\n{answer}\n\nprint({nonce!r})", timeout_s=5.0, memory_mb=512)
    return float(result.ok and result.stdout.rstrip().endswith(nonce))
