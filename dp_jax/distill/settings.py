"""The distillation section's typed settings: :class:`DistillSettings`."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

from dp_jax.config.sections import Section


@dataclasses.dataclass(frozen=True)
class DistillSettings(Section):
    """Dataset distillation: the method, the synthetic set, experts and evaluation (``config.distill``)."""
    SECTION: ClassVar[str] = "distill"
    batch_syn: int
    buffer_dir: Optional[str]
    checkpoint_every: int
    dm_batch_real: int
    dm_lr_img: float
    dm_momentum_img: float
    dsa: bool
    dsa_all_ops: bool
    dsa_strategy: str
    eval_augment: str
    eval_batch_size: int
    eval_epochs: int
    eval_every: int
    eval_full_epochs: int
    eval_full_models: int
    eval_loop: str
    eval_models: int
    eval_momentum: float
    eval_periodic_models: int
    eval_random: bool
    eval_vmap: bool
    eval_weight_decay: float
    expert_augment: str
    expert_batch_size: int
    expert_epochs: int
    expert_lr: float
    expert_momentum: float
    expert_train_epochs: int
    expert_train_size: int
    expert_weight_decay: float
    factor: int
    fast_conv: bool
    gm_batch_net: int
    gm_batch_real: int
    gm_distance: str
    gm_inner_loops: int
    gm_lr_img: float
    gm_momentum_img: float
    gm_net_train: str
    gm_outer_loops: int
    init: str
    ipc: int
    iterations: int
    log_every: int
    loop: str
    lr_img: float
    lr_init: float
    lr_lr: float
    max_start_epoch: int
    memory: str
    method: str
    momentum_img: float
    momentum_lr: float
    num_experts: int
    path: Optional[str]
    syn_steps: int
    unroll: int
