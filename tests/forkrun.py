"""Runs many `modelopt-streaming` commands quickly: one interpreter imports the tool (and torch) once, then
forks a child per command that calls the CLI's ``main`` exactly as ``python -m modelopt_streaming`` does.
The parent never runs torch code, so each child starts as clean as a fresh process, in a fraction of the
time. Used by the fault-injection tests, which need dozens of runs killed at chosen steps.

As a script: ``python forkrun.py JOBS.json`` prints a JSON list of results; from a test, ``run_jobs``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def tree_hashes(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()
    }


def run_jobs(jobs: list[dict]) -> list[dict]:
    """Each job: ``argv`` (the CLI's arguments), ``env`` (extra environment), optional ``snapshot`` (a
    directory whose file hashes are recorded right after the command). Returns, per job, ``rc`` (negative:
    killed by that signal), ``stderr`` and ``tree`` (the snapshot, or None). Jobs run in order."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "jobs.json"
        spec.write_text(json.dumps([{**j, "argv": [str(a) for a in j["argv"]]} for j in jobs]))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELOPT_STREAMING_FAULT")}
        r = subprocess.run(
            [sys.executable, __file__, str(spec), tmp], capture_output=True, text=True, env=env, check=False
        )
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout)


def _child(job: dict, err_path: str) -> None:
    from modelopt_streaming import cli

    code = 99
    try:
        os.environ.update(job.get("env", {}))
        fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        code = cli.main(job["argv"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported through stderr and the exit code
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    tmp = Path(sys.argv[2])
    import modelopt_streaming.cli  # noqa: F401 - imported once, before the forks
    import modelopt_streaming.jobs.quantize  # noqa: F401

    results = []
    for i, job in enumerate(jobs):
        err_path = str(tmp / f"stderr-{i}")
        pid = os.fork()
        if pid == 0:
            _child(job, err_path)
        _, status = os.waitpid(pid, 0)
        snap = job.get("snapshot")
        results.append(
            {
                "rc": os.waitstatus_to_exitcode(status),
                "stderr": Path(err_path).read_text(errors="replace"),
                "tree": tree_hashes(Path(snap)) if snap and Path(snap).exists() else None,
            }
        )
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
