"""The checkpoint registry: best per domain, pinned external teachers, atomic file, CLI."""

import json

import pytest

from relaxrl.pipeline.registry import CheckpointRegistry, main


def model_dir(tmp_path, name):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text("{}")
    return str(d)


def test_offers_keep_the_best_checkpoint_per_domain_and_persist(tmp_path):
    path = str(tmp_path / "reg.json")
    reg = CheckpointRegistry(path)
    assert reg.offer("add", "/ck/a1", 0.5, metric="accuracy", stage="s1", step=10)
    assert not reg.offer("add", "/ck/a2", 0.4, metric="accuracy", stage="s1", step=20)
    assert reg.offer("add", "/ck/a3", 0.7, metric="accuracy", stage="s1", step=30)
    assert reg.offer("sub", "/ck/s1", 0.2, metric="accuracy", stage="s2", step=5)
    again = CheckpointRegistry(path)  # read back from the file
    assert again.get("add").path == "/ck/a3" and again.get("add").score == 0.7 and again.get("add").step == 30
    assert again.teachers(["add", "sub"]) == {"add": "/ck/a3", "sub": "/ck/s1"}
    assert set(json.loads((tmp_path / "reg.json").read_text())["domains"]) == {"add", "sub"}
    with pytest.raises(KeyError, match="mul"):
        again.teachers(["add", "mul"])
    assert again.forget_stage("s1") == ["add"] and CheckpointRegistry(path).get("add") is None


def test_an_external_teacher_is_pinned(tmp_path):
    reg = CheckpointRegistry(str(tmp_path / "reg.json"))
    ext = model_dir(tmp_path, "teacher")
    reg.register("add", ext, score=0.9)
    assert not reg.offer("add", "/ck/a", 0.99, metric="accuracy", stage="s1", step=1)
    assert reg.forget_stage("external") == []
    assert reg.teachers(["add"]) == {"add": ext}
    with pytest.raises(FileNotFoundError, match="config.json"):
        reg.register("sub", str(tmp_path))


def test_cli_registers_an_external_checkpoint(tmp_path, capsys):
    ext = model_dir(tmp_path, "teacher")
    main([str(tmp_path / "reg.json"), "register", "sub", ext, "--score", "0.8"])
    assert f"sub: {ext} accuracy=0.8 stage=external" in capsys.readouterr().out
    assert CheckpointRegistry(str(tmp_path / "reg.json")).get("sub").pinned


def test_a_malformed_registry_file_is_named(tmp_path):
    bad = tmp_path / "reg.json"
    bad.write_text('{"domains": {"add": {"oops": 1}}}')
    with pytest.raises(ValueError, match="malformed"):
        CheckpointRegistry(str(bad))
