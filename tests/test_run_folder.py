"""One run per output folder, and checkpoint writes that cannot be redirected or left half."""

import os
import pickle
import shutil
import signal
import threading

import pytest
import torch

from neco_loss.training.run_folder import LAST, LOCK, finished_run, run_lock, save_atomic
from tests.test_stop_signals import TIMEOUT, neco_train, wait_for_steps, write_config


@pytest.mark.slow
def test_a_second_run_into_a_folder_in_use_fails_at_once(tmp_path):
    config, output = write_config(tmp_path, "run", 1)
    first = neco_train(config, "--max-steps", "2000")
    try:
        wait_for_steps(output, first)
        seconds = [neco_train(config, *flags) for flags in ([], ["--overwrite"], ["--resume"])]
        for second in seconds:  # started together: the suite waits for one start-up, not three
            assert second.wait(TIMEOUT) == 1
            error = second.stderr.read().strip()
            assert error == (
                f"error: {output} is in use by another neco train (process {first.pid}): wait "
                "for it to end, or choose another --output-dir."
            )
        assert first.poll() is None  # untouched, still training
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(TIMEOUT)
    after = neco_train(config, "--overwrite", "--max-steps", "1")  # the kernel freed the lock
    assert after.wait(TIMEOUT) == 0, after.stderr.read()


def test_the_lock_is_released_on_any_exit(tmp_path):
    with pytest.raises(RuntimeError, match="inside"), run_lock(tmp_path):
        with pytest.raises(FileExistsError, match=f"process {os.getpid()}"):
            with run_lock(tmp_path):
                pass
        raise RuntimeError("inside")
    with run_lock(tmp_path):  # free again
        assert (tmp_path / LOCK).read_text() == ""  # never written: nothing else is touched


def test_a_link_planted_at_the_old_temporary_name_is_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / f"{LAST}.tmp").symlink_to(victim)  # the name the checkpoint used to take
    save_atomic({"step": 1}, tmp_path / LAST)
    assert victim.read_text() == "precious"
    assert torch.load(tmp_path / LAST, weights_only=True) == {"step": 1}
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        [LAST, f"{LAST}.tmp", "victim.txt"]
    )
    assert (tmp_path / LAST).stat().st_mode & 0o777 == 0o644


def test_concurrent_and_failed_writes(tmp_path):
    path = tmp_path / LAST
    errors: list[BaseException] = []

    def write(value: int) -> None:
        try:
            for _ in range(20):
                save_atomic({"step": value}, path)
        except BaseException as error:  # collected: the test fails on any
            errors.append(error)

    threads = [threading.Thread(target=write, args=(value,)) for value in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert torch.load(path, weights_only=True)["step"] in (1, 2)
    with pytest.raises((pickle.PicklingError, AttributeError)):  # a lambda: fails half-way
        save_atomic({"step": 3, "bad": lambda: None}, path)
    assert torch.load(path, weights_only=True)["step"] in (1, 2)  # the previous file is kept
    assert [p.name for p in tmp_path.iterdir()] == [LAST]  # no partial file left


def test_a_finished_run_is_reused_only_under_its_own_config(tmp_path):
    """An ablation file edited after its runs finished must not report the old runs."""
    from neco_loss.training import train
    from tests.test_training import tiny_config

    train(tiny_config(tmp_path / "run", max_steps=1), progress=False)
    same = tiny_config(tmp_path / "run", max_steps=1)
    assert finished_run(same, resume=True, overwrite=False) is not None
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "run", moved)  # a copied folder is still the same run
    assert finished_run(tiny_config(moved, max_steps=1), True, False) is not None
    edited = tiny_config(tmp_path / "run", max_steps=1, lr_backbone=5e-4)
    with pytest.raises(ValueError, match=r"other values for \['lr_backbone'\]"):
        finished_run(edited, resume=True, overwrite=False)
