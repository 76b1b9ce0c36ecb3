"""The set-up every run of an experiment shares: the data, the model, the optimiser, the
compiled trainer and the device-resident arrays (:class:`dp_jax.pruning.rounds.Setup`)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dp_jax.training import optimizers
from dp_jax import masks as masks_lib
from dp_jax.data import crops, load_dataset, pipeline
from dp_jax.models import contract, create_model, init_variables
from dp_jax.pruning import rounds as prune_lib
from dp_jax.pruning.settings import Experiment
from dp_jax.storage import fileio
from dp_jax.training import trainer as train_lib


def load_data(config: Experiment):
    """The experiment's dataset (seeded by ``config.seed``): in memory, or a host stream."""
    if config.data.pipeline == "stream":
        return pipeline.from_config(config.data, seed=config.seed)
    return load_dataset(config.data, seed=config.seed)


def build_setup(config: Experiment, dataset, *, metrics_path: str | None = None,
                log=None) -> prune_lib.Setup:
    """Model, optimiser, compiled trainer and device-resident data for ``config``.

    Epoch metrics go to ``log(**row)`` (a :class:`dp_jax.rundir.metrics.MetricsLog`) if given,
    else are appended to ``metrics_path`` if given.

    ``dataset`` is a ``Dataset`` (held on the devices) or, for ``data.pipeline='stream'``,
    a ``pipeline.StreamingData`` (read by the host while training).
    """
    model = create_model(config.model, num_classes=dataset.num_classes)
    # A model that breaks the contract fails here, by name, not inside a compiled training step.
    contract.check(model, dataset.image_shape, dataset.num_classes)
    stream = dataset if isinstance(dataset, pipeline.StreamingData) else None
    n = stream.num_train if stream is not None else len(dataset.y_train)
    num_steps = train_lib.total_steps(config.train.epochs, n, config.train.batch_size)
    tx = optimizers.make_optimizer(config.train, num_steps)
    mesh = None
    put = jax.device_put
    if config.parallel.data_parallel:
        mesh = Mesh(np.array(jax.devices()), ("data",))
        replicated = NamedSharding(mesh, P())
        put = lambda a: jax.device_put(a, replicated)  # noqa: E731
    shape_vars = jax.eval_shape(lambda k: init_variables(model, k, dataset.image_shape),
                                jax.random.key(0))
    loop = train_lib.resolve_loop(config.train.loop, shape_vars["params"], model,
                                  dataset.image_shape)
    # In memory, crop+flip runs on the device inside the step; a stream augments on the host.
    augment = (crops.device_crop_flip
               if stream is None and config.data.augment == "crop_flip" else None)
    trainer = train_lib.Trainer(model, tx, batch_size=config.train.batch_size, num_train=n,
                                loop=loop, unroll=config.train.unroll, mesh=mesh,
                                eval_batch_size=config.train.eval_batch_size, augment=augment,
                                compute_dtype=config.train.compute_dtype)

    def log_epoch(**kw):
        if log is not None:
            log(**kw)
        elif metrics_path:
            fileio.append_jsonl(metrics_path, kw)

    # With a mesh the variables are created replicated on it: on several hosts every jitted
    # program needs global arrays, not each host's local copy.
    init_jit = jax.jit(lambda k: init_variables(model, k, dataset.image_shape),
                       out_shardings=None if mesh is None else replicated)
    arrays = {k: None if stream is not None else put(np.asarray(getattr(dataset, k)))
              for k in ("x_train", "y_train", "x_test", "y_test")}
    return prune_lib.Setup(
        model=model, trainer=trainer, tx=tx, **arrays, stream=stream,
        image_shape=dataset.image_shape, num_steps=num_steps, rounds=config.prune.rounds,
        fraction=config.prune.fraction, scope=config.prune.scope,
        on_empty_layer=config.prune.on_empty_layer, init_fn=init_jit, log_epoch=log_epoch,
        num_classes=dataset.num_classes, layer_rates=masks_lib.parse_layer_rates(config.prune.layer_rates),
        min_per_layer=int(config.prune.min_per_layer))
