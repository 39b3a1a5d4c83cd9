r"""``neco-solo-pretrain``: solo-learn's ``main_pretrain.py`` flow with NeCo's boxed crops.

solo-learn's ``main_pretrain.py`` is not installed by pip and builds its own transform, which
drops the crop boxes. This entry point reuses solo-learn's pieces (``parse_cfg``,
``prepare_datasets``, ``prepare_dataloader``, ``Checkpointer``, ``AutoResumer``, the
classification loaders for validation) with ``BoxedMultiCrop`` as the transform::

    neco-solo-pretrain --config-path examples/solo_learn --config-name neco_vits14.yaml \\
        data.train_path=/data/coco/train2017

Any key can be overridden on the command line, as with solo-learn (hydra).
"""

# ruff: noqa: E402  (solo-learn is imported after the version check: 1.0.2 fails obscurely)
from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from neco_loss.integrations.solo_learn.registry import register, require_solo_main

require_solo_main()

import hydra
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from neco_loss.integrations.solo_learn.transform import BoxedMultiCrop
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from solo.args.pretrain import parse_cfg
from solo.data.classification_dataloader import prepare_data
from solo.data.pretrain_dataloader import (
    build_transform_pipeline,
    prepare_dataloader,
    prepare_datasets,
)
from solo.methods import METHODS
from solo.utils.auto_resumer import AutoResumer
from solo.utils.checkpointer import Checkpointer
from solo.utils.misc import make_contiguous
from torch import Tensor
from torch.utils.data import DataLoader


def solo_photometric(
    dataset: str,
) -> Callable[[Mapping[str, Any]], Callable[[Image.Image], Tensor]]:
    """A builder of solo-learn's pipeline for an augmentation entry, without crop and flip.

    The entry is copied with ``rrc.enabled: false`` (solo-learn then resizes to ``crop_size``,
    a no-op on the ``crop_size`` square crops of ``BoxedMultiCrop``) and
    ``horizontal_flip.prob: 0``.
    """

    def build(entry: Mapping[str, Any]) -> Callable[[Image.Image], Tensor]:
        photometric = OmegaConf.create(OmegaConf.to_container(OmegaConf.create(dict(entry))))
        photometric.rrc.enabled = False
        photometric.horizontal_flip.prob = 0.0
        return build_transform_pipeline(dataset, photometric)

    return build


def boxed_multicrop(cfg: DictConfig) -> BoxedMultiCrop:
    """``BoxedMultiCrop`` for ``cfg.augmentations`` with solo-learn's photometric pipelines."""
    return BoxedMultiCrop(
        cfg.augmentations,
        solo_photometric(cfg.data.dataset),
        min_overlap=cfg.method_kwargs.min_overlap,
    )


def parse_neco_cfg(cfg: DictConfig) -> DictConfig:
    """solo-learn's ``parse_cfg`` for a NeCo config (registers NeCo first).

    ``devices`` may be a count (``devices: 1`` on CPU) as well as solo-learn's device list.

    Raises:
        ValueError: If ``cfg.method`` is not ``neco`` or ``data.format`` is ``dali`` (NeCo's
            boxes come from the PIL pipeline).

    """
    OmegaConf.set_struct(cfg, False)
    register()
    if cfg.get("method") != "neco":
        raise ValueError(
            f"neco-solo-pretrain trains method: neco, but the config has {cfg.get('method')!r}."
        )
    on_cpu = cfg.get("accelerator") == "cpu"
    if isinstance(cfg.get("devices"), int):  # parse_cfg counts devices with len()
        cfg.devices = list(range(cfg.devices))
    cfg = parse_cfg(cfg)
    if on_cpu:  # Lightning's CPU accelerator takes a process count, not a device list
        cfg.devices = len(cfg.devices)
    if cfg.data.format == "dali":
        raise ValueError("data.format: dali cannot return crop boxes; use image_folder or h5.")
    return cfg


def pretrain(cfg: DictConfig) -> Trainer:
    """Train NeCo from a solo-learn config (composed by hydra); returns the fitted ``Trainer``.

    Raises:
        ValueError: See ``parse_neco_cfg``.

    """
    cfg = parse_neco_cfg(cfg)
    seed_everything(cfg.seed)
    model = METHODS["neco"](cfg)
    make_contiguous(model)
    train_dataset = prepare_datasets(
        cfg.data.dataset,
        boxed_multicrop(cfg),
        train_data_path=cfg.data.train_path,
        data_format=cfg.data.format,
        no_labels=cfg.data.no_labels,
        data_fraction=cfg.data.fraction,
    )
    train_loader = prepare_dataloader(
        train_dataset, batch_size=cfg.optimizer.batch_size, num_workers=cfg.data.num_workers
    )
    trainer = Trainer(**_trainer_kwargs(cfg, _callbacks(cfg)))
    trainer.fit(model, train_loader, _val_loader(cfg), ckpt_path=_resume_path(cfg))
    return trainer


def _val_loader(cfg: DictConfig) -> DataLoader | None:
    """solo-learn's classification validation loader, when the data has labels and a val path."""
    if cfg.data.no_labels or cfg.data.val_path is None:
        return None
    _, val_loader = prepare_data(
        cfg.data.dataset,
        train_data_path=cfg.data.train_path,
        val_data_path=cfg.data.val_path,
        data_format=cfg.data.format,
        batch_size=cfg.optimizer.batch_size,
        num_workers=cfg.data.num_workers,
    )
    return val_loader


def _resume_path(cfg: DictConfig) -> str | None:
    """``resume_from_checkpoint``, or solo-learn's auto-resume match."""
    if cfg.resume_from_checkpoint is not None:
        return str(cfg.resume_from_checkpoint)
    if cfg.auto_resume.enabled:
        resumer = AutoResumer(
            checkpoint_dir=os.path.join(cfg.checkpoint.dir, cfg.method),
            max_hours=cfg.auto_resume.max_hours,
        )
        path, _ = resumer.find_checkpoint(cfg)
        return path
    return None


def _callbacks(cfg: DictConfig) -> list[Callback]:
    callbacks: list[Callback] = []
    if cfg.checkpoint.enabled:
        callbacks.append(
            Checkpointer(
                cfg,
                logdir=os.path.join(cfg.checkpoint.dir, cfg.method),
                frequency=cfg.checkpoint.frequency,
                keep_prev=cfg.checkpoint.keep_prev,
            )
        )
    if cfg.wandb.enabled:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    return callbacks


def _trainer_kwargs(cfg: DictConfig, callbacks: list[Callback]) -> dict[str, Any]:
    """The config keys that are ``Trainer`` arguments, plus logger, callbacks and strategy."""
    values = OmegaConf.to_container(cfg)
    assert isinstance(values, dict)
    valid = inspect.signature(Trainer.__init__).parameters
    kwargs = {name: values[name] for name in valid if name in values}
    logger: Any = None
    if cfg.wandb.enabled:
        from lightning.pytorch.loggers.wandb import WandbLogger

        logger = WandbLogger(
            name=cfg.name,
            project=cfg.wandb.project,
            entity=cfg.wandb.entity,
            offline=cfg.wandb.offline,
        )
        logger.log_hyperparams(values)
    strategy = cfg.strategy
    if strategy == "ddp":
        from lightning.pytorch.strategies.ddp import DDPStrategy

        strategy = DDPStrategy(find_unused_parameters=False)
    kwargs.update(
        {
            "logger": logger,  # None: Lightning's default logger, as solo-learn's script
            "callbacks": callbacks,
            "enable_checkpointing": False,
            "strategy": strategy if strategy is not None else "auto",
        }
    )
    return kwargs


@hydra.main(version_base="1.2", config_path=None)
def _hydra_main(cfg: DictConfig) -> None:
    pretrain(cfg)


def main() -> None:
    """Console entry point; hydra reads ``--config-path``/``--config-name`` and overrides.

    A relative ``--config-path`` (``-cp``) is made absolute against the working directory, as a
    user typing it means; hydra alone would resolve it against this module's package.
    """
    sys.argv = absolute_config_path(sys.argv)
    _hydra_main()


def absolute_config_path(argv: list[str]) -> list[str]:
    """``argv`` with a relative ``--config-path``/``-cp`` value made absolute (cwd-based)."""
    argv = list(argv)
    for index, argument in enumerate(argv):
        for flag in ("--config-path", "-cp"):
            if argument == flag and index + 1 < len(argv):
                argv[index + 1] = _absolute(argv[index + 1])
            elif argument.startswith(flag + "="):
                argv[index] = f"{flag}={_absolute(argument[len(flag) + 1 :])}"
    return argv


def _absolute(path: str) -> str:
    if "://" in path or Path(path).expanduser().is_absolute():  # pkg://, file://, /abs
        return path
    return str(Path(path).expanduser().resolve())
