"""No config file or run folder can make ``neco`` run code: only ``--trust-remote-code`` can.

A torch.hub repo (``model: hub:REPO:ENTRY``) runs its ``hubconf.py``; transformers'
``trust_remote_code`` runs a model folder's Python files. Each test plants code that leaves a
marker file when it runs.
"""

import os
import shutil

import pytest
import yaml

from neco_loss.app.cli import main
from neco_loss.backbones import TRUST_REMOTE_CODE, build
from tests.test_training import TINY


@pytest.fixture
def hub_repo(tmp_path):
    """A local torch.hub repo whose entry point leaves ``marker`` and then fails."""
    repo, marker = tmp_path / "repo", tmp_path / "hubconf-ran"
    repo.mkdir()
    (repo / "hubconf.py").write_text(
        "import pathlib\n"
        "dependencies = []\n\n\n"
        "def entry(**kwargs):\n"
        f"    pathlib.Path({str(marker)!r}).write_text('ran')\n"
        "    raise RuntimeError('hubconf ran')\n"
    )
    return repo, marker


def write_config(tmp_path, **keys) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "run"), **keys}))
    return str(path)


def test_a_config_cannot_run_a_hub_repo(tmp_path, hub_repo):
    repo, marker = hub_repo
    config = write_config(tmp_path, model=f"hub:{repo}:entry", model_kwargs={"source": "local"})
    with pytest.raises(SystemExit, match="runs the hubconf.py of .* pass --trust-remote-code"):
        main(["train", config, "--max-steps", "1", "--quiet"])
    assert not marker.exists()


def test_the_command_line_allows_it_for_that_command_only(tmp_path, hub_repo, monkeypatch):
    repo, marker = hub_repo
    monkeypatch.setenv(TRUST_REMOTE_CODE, "1")  # a shell profile cannot allow it either
    config = write_config(tmp_path, model=f"hub:{repo}:entry", model_kwargs={"source": "local"})
    with pytest.raises(SystemExit, match="pass --trust-remote-code"):
        main(["train", config, "--max-steps", "1", "--quiet"])
    assert not marker.exists()
    with pytest.raises(SystemExit, match="RuntimeError: hubconf ran"):
        main(["train", config, "--max-steps", "1", "--quiet", "--trust-remote-code"])
    assert marker.read_text() == "ran"
    assert TRUST_REMOTE_CODE not in os.environ  # cleared when the command ended


def test_transformers_remote_code_from_a_config_is_refused(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    config = write_config(tmp_path, model=str(folder), model_kwargs={"trust_remote_code": True})
    with pytest.raises(SystemExit, match="trust_remote_code runs the Python files of"):
        main(["train", config, "--max-steps", "1", "--quiet"])


def test_a_run_folder_cannot_make_eval_run_code(tmp_path, hub_repo):
    """``neco eval`` reads the run folder's config.yaml: a planted hub model is refused."""
    repo, marker = hub_repo
    config = write_config(tmp_path)
    main(["train", config, "--max-steps", "1", "--quiet"])
    run = tmp_path / "run"
    planted = yaml.safe_load((run / "config.yaml").read_text())
    planted.update(model=f"hub:{repo}:entry", model_kwargs={"source": "local"})
    (run / "config.yaml").write_text(yaml.safe_dump(planted))
    with pytest.raises(SystemExit, match="pass --trust-remote-code"):
        main(["eval", "in-context", "--checkpoint", str(run), "--val-images", "2"])
    assert not marker.exists()
    shutil.rmtree(run)


def test_the_library_refuses_too_unless_allowed(hub_repo, monkeypatch):
    repo, marker = hub_repo
    monkeypatch.delenv(TRUST_REMOTE_CODE, raising=False)
    with pytest.raises(PermissionError, match="pass --trust-remote-code"):
        build(f"hub:{repo}:entry", False, source="local")
    assert not marker.exists()
    monkeypatch.setenv(TRUST_REMOTE_CODE, "1")
    with pytest.raises(RuntimeError, match="hubconf ran"):
        build(f"hub:{repo}:entry", False, source="local")
    assert marker.exists()
