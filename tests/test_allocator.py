"""launch/cpu_tuning.py: opt-in host tuning (a preloaded malloc for the demo's commands, glibc's
mallopt in-process), off by default and never with CUDA."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import maskvid.launch.cpu_tuning as allocator
from maskvid.launch.cpu_tuning import AllocatorError, child_env, choose


def test_unknown_setting_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("MASKVID_ALLOCATOR", "hoard")
    with pytest.raises(AllocatorError, match="MASKVID_ALLOCATOR='hoard': expected one of auto, tcmalloc, jemalloc, system"):
        choose()
    from maskvid.launch.cli_errors import _user_error_types

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
        if os.environ.get("CI"):  # .ci/run installs both: missing there is a broken CI image, not a skip
            pytest.fail(f"{kind} is not installed, but .ci/run installs it")
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
    # The ratios are those of the reported times (to their rounding).
    assert system["slowdown_last_over_first"] == pytest.approx(
        system["last_window_step_s"] / system["first_window_step_s"], rel=2e-2), system
    # 4 steps in windows of 2: the total is twice the sum of the two windows' medians (means of 2).
    assert system["total_s"] == pytest.approx(2 * (system["first_window_step_s"] + system["last_window_step_s"]),
                                              abs=0.06), system
    jemalloc = result["allocators"]["jemalloc"]
    if allocator.find("jemalloc") is None:
        assert "apt-get install libjemalloc2" in jemalloc["skipped"]
    else:
        assert "libjemalloc" in jemalloc["preloaded"]
        assert jemalloc["speedup_over_system"] == pytest.approx(system["total_s"] / jemalloc["total_s"], abs=1e-3)


def test_tuning_is_opt_in_and_never_with_cuda(monkeypatch):
    monkeypatch.delenv(allocator.ENV, raising=False)
    monkeypatch.setattr(allocator, "_cuda_available", lambda: False)
    assert not allocator.requested() and not allocator.enabled()
    for value in ("1", "true", "ON"):
        monkeypatch.setenv(allocator.ENV, value)
        assert allocator.enabled()
    monkeypatch.setenv(allocator.ENV, "0")
    assert not allocator.enabled() and allocator.enabled(True)  # the --cpu-tuning flag wins
    monkeypatch.setenv(allocator.ENV, "1")
    assert not allocator.enabled(False)
    monkeypatch.setattr(allocator, "_cuda_available", lambda: True)
    assert allocator.requested() and not allocator.enabled() and not allocator.enabled(True)


def test_fit_tunes_glibc_only_when_enabled(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(allocator, "_cuda_available", lambda: False)
    monkeypatch.delenv(allocator.ENV, raising=False)
    assert allocator.apply_in_process() is False and calls == []
    monkeypatch.setenv(allocator.ENV, "1")
    assert allocator.apply_in_process() is True and calls == [1]
    monkeypatch.setattr(allocator, "_cuda_available", lambda: True)
    assert allocator.apply_in_process() is False and calls == [1]


def test_keep_freed_memory_really_calls_mallopt():
    import ctypes.util

    if not sys.platform.startswith("linux") or not ctypes.util.find_library("c"):
        pytest.skip("glibc only")
    # A child, so this test process keeps glibc's defaults; M_MMAP_THRESHOLD's effect is visible
    # as a large allocation served from the heap (brk) instead of a fresh mapping.
    code = ("import ctypes, ctypes.util, sys; from maskvid.launch.cpu_tuning import keep_freed_memory; "
            "libc = ctypes.CDLL(ctypes.util.find_library('c')); libc.sbrk.restype = ctypes.c_void_p; "
            "tune = sys.argv[1] == '1'; ok = keep_freed_memory() if tune else True; "
            "libc.malloc.restype = ctypes.c_void_p; before = libc.sbrk(0); p = libc.malloc(64 << 20); "
            "print(ok, libc.sbrk(0) - before >= (64 << 20))")
    from tests.conftest import REPO

    out = {flag: subprocess.run([sys.executable, "-c", code, flag], capture_output=True, text=True, check=True,
                                cwd=REPO).stdout.split() for flag in ("0", "1")}
    assert out["0"] == ["True", "False"]  # glibc's default: 64 MiB is mmapped, the heap does not grow
    assert out["1"] == ["True", "True"]  # tuned: served from the heap


def test_preloaded_reports_what_the_environment_already_preloads():
    assert allocator.preloaded({}) == "system"
    assert allocator.preloaded({"LD_PRELOAD": "/x/libfoo.so /usr/lib/libjemalloc.so.2"}) == "jemalloc"
    assert allocator.preloaded({"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}) == "tcmalloc"


def record_demo_commands(monkeypatch, demo) -> dict:
    """The demo's commands are not run: the environment each would get is recorded in the dict."""
    seen = {}

    class FakePopen:
        def __init__(self, cmd, env, **kwargs):
            seen["env"] = env
            self.stdout = __import__("io").BytesIO(b"")

        def wait(self):
            return 0

    monkeypatch.setattr(demo.subprocess, "Popen", FakePopen)
    return seen


@pytest.mark.parametrize("setting", ["tcmalloc", "system"])
def test_the_demo_runs_its_commands_on_the_chosen_allocator_when_tuning(tmp_path, monkeypatch, setting):
    import maskvid.launch.demo_pipeline as demo

    monkeypatch.setattr(allocator, "find", lambda kind: f"/opt/lib{kind}.so")
    monkeypatch.setattr(allocator, "_cuda_available", lambda: False)
    monkeypatch.setenv("MASKVID_ALLOCATOR", setting)
    monkeypatch.setenv(allocator.ENV, "1")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    seen = record_demo_commands(monkeypatch, demo)
    pipeline = demo.DemoPipeline(tmp_path / "out", demo.QUICK, 2.0)
    (tmp_path / "out").mkdir(parents=True, exist_ok=True)
    pipeline.maskvid("data", "synthetic", "--help")
    assert pipeline.cpu_tuning and pipeline.allocator == setting
    assert seen["env"].get("LD_PRELOAD") == ("/opt/libtcmalloc.so" if setting == "tcmalloc" else None)
    assert seen["env"][allocator.ENV] == "1"


@pytest.mark.parametrize("cuda", [False, True])
def test_by_default_the_demo_preloads_nothing(tmp_path, monkeypatch, cuda):
    """Off by default on a CPU; with CUDA even --cpu-tuning is ignored."""
    import maskvid.launch.demo_pipeline as demo

    monkeypatch.setattr(allocator, "find", lambda kind: f"/opt/lib{kind}.so")
    monkeypatch.setattr(allocator, "_cuda_available", lambda: cuda)
    monkeypatch.delenv(allocator.ENV, raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    seen = record_demo_commands(monkeypatch, demo)
    (tmp_path / "out").mkdir()
    pipeline = demo.DemoPipeline(tmp_path / "out", demo.QUICK, 2.0, cpu_tuning_flag=True if cuda else None)
    pipeline.maskvid("data", "synthetic", "--help")
    assert not pipeline.cpu_tuning and pipeline.allocator == "system"
    assert "LD_PRELOAD" not in seen["env"] and allocator.ENV not in seen["env"]
