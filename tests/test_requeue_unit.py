"""SlurmRequeue's last step without a cluster: a node with no `scontrol` gets a line saying what to
run, not a traceback after the checkpoint was saved."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from maskvid.launch.requeue import REQUEUE_FILE_ENV, SlurmRequeue


def test_a_missing_scontrol_is_reported_not_raised(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing to run here
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.delenv(REQUEUE_FILE_ENV, raising=False)
    saved = tmp_path / "requeue-step=7.ckpt"
    SlurmRequeue().after_save(SimpleNamespace(is_global_zero=True), saved)
    out = capsys.readouterr().out
    assert "could not requeue job 4242" in out and "scontrol requeue 4242" in out and str(saved) in out


def test_with_a_requeue_file_the_job_is_written_for_the_sbatch_script(tmp_path, monkeypatch):
    marker = tmp_path / "requeue"
    monkeypatch.setenv(REQUEUE_FILE_ENV, str(marker))
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "100")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    SlurmRequeue().after_save(SimpleNamespace(is_global_zero=True), Path("x.ckpt"))
    assert marker.read_text() == "100_3\n"
    marker.unlink()
    SlurmRequeue().after_save(SimpleNamespace(is_global_zero=False), Path("x.ckpt"))
    assert not marker.exists()  # only rank 0 asks
