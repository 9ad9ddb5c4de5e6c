"""launch/allocator.py: the malloc that `maskvid demo` runs its commands on."""

from __future__ import annotations

import subprocess
import sys

import pytest

import launch.allocator as allocator
from launch.allocator import AllocatorError, child_env, choose


def test_unknown_setting_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("MASKVID_ALLOCATOR", "hoard")
    with pytest.raises(AllocatorError, match="MASKVID_ALLOCATOR='hoard': expected one of auto, tcmalloc, jemalloc, system"):
        choose()
    from launch.cli_errors import _user_error_types

    assert issubclass(AllocatorError, _user_error_types())  # reported as one line by the CLI


def test_system_preloads_nothing():
    env, kind = child_env({"PATH": "/bin"}, "system")
    assert kind == "system" and env == {"PATH": "/bin"}


def test_auto_prefers_tcmalloc_then_jemalloc_then_the_system(monkeypatch):
    installed = {"jemalloc": "/opt/libjemalloc.so.2", "tcmalloc": "/opt/libtcmalloc_minimal.so.4"}
    monkeypatch.setattr(allocator, "find", lambda kind: installed.get(kind))
    assert choose("auto") == ("tcmalloc", "/opt/libtcmalloc_minimal.so.4")
    assert choose("jemalloc") == ("jemalloc", "/opt/libjemalloc.so.2")
    env, kind = child_env({"LD_PRELOAD": "/opt/libother.so"}, "auto")
    assert kind == "tcmalloc" and env["LD_PRELOAD"] == "/opt/libtcmalloc_minimal.so.4:/opt/libother.so"
    del installed["tcmalloc"]
    assert choose("auto")[0] == "jemalloc"
    installed.clear()
    assert choose("auto") == ("system", None)
    with pytest.raises(AllocatorError, match="apt-get install libjemalloc2"):
        choose("jemalloc")


def test_an_allocator_already_preloaded_is_kept_and_not_added_twice(monkeypatch):
    monkeypatch.setattr(allocator, "find", lambda kind: "/usr/lib/libtcmalloc_minimal.so.4")
    env, kind = child_env({"LD_PRELOAD": "/somewhere/libjemalloc.so.2"}, "auto")
    assert kind == "jemalloc" and env["LD_PRELOAD"] == "/somewhere/libjemalloc.so.2"


@pytest.mark.parametrize("kind", ["jemalloc", "tcmalloc"])
def test_the_child_really_runs_on_it(kind):
    if allocator.find(kind) is None:
        pytest.skip(f"{kind} is not installed here")
    env, chosen = child_env({"PATH": "/usr/bin:/bin"}, kind)
    assert chosen == kind
    maps = subprocess.run([sys.executable, "-c", "print(open('/proc/self/maps').read())"], env=env,
                          capture_output=True, text=True, check=True).stdout
    assert f"lib{allocator._LIBRARIES[kind][0]}" in maps


def test_allocator_benchmark_reports_each_allocator(tmp_path):
    from pathlib import Path

    import json

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "allocator.json"
    proc = subprocess.run([sys.executable, str(repo / "benchmarks/allocator.py"), "--steps", "4", "--window", "2",
                           "--batch-size", "2", "--allocators", "system", "jemalloc", "--json-out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    system = result["allocators"]["system"]
    assert system["preloaded"] is None and system["first_window_step_s"] > 0 and system["total_s"] > 0
    jemalloc = result["allocators"]["jemalloc"]
    if allocator.find("jemalloc") is None:
        assert "apt-get install libjemalloc2" in jemalloc["skipped"]
    else:
        assert "libjemalloc" in jemalloc["preloaded"] and jemalloc["speedup_over_system"] > 0


@pytest.mark.parametrize("setting", ["tcmalloc", "system"])
def test_the_demo_runs_its_commands_on_the_chosen_allocator(tmp_path, monkeypatch, setting):
    import launch.demo_pipeline as demo

    monkeypatch.setattr(allocator, "find", lambda kind: f"/opt/lib{kind}.so")
    monkeypatch.setenv("MASKVID_ALLOCATOR", setting)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    seen = {}

    class FakePopen:
        def __init__(self, cmd, env, **kwargs):
            seen["env"] = env
            self.stdout = __import__("io").BytesIO(b"")

        def wait(self):
            return 0

    monkeypatch.setattr(demo.subprocess, "Popen", FakePopen)
    pipeline = demo.DemoPipeline(tmp_path / "out", demo.QUICK, 2.0)
    (tmp_path / "out").mkdir(parents=True, exist_ok=True)
    pipeline.maskvid("data", "synthetic", "--help")
    assert pipeline.allocator == setting
    assert seen["env"].get("LD_PRELOAD") == ("/opt/libtcmalloc.so" if setting == "tcmalloc" else None)
