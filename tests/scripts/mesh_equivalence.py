"""Train the same masked network with and without a 4-device data-parallel mesh.

Run in a fresh process (XLA_FLAGS must be set before jax is imported); prints
JSON with the maximum parameter difference and the device count.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from dp_jax import masks
from dp_jax.training import trainer as train  # noqa: E402
from dp_jax.models import create_model, init_variables  # noqa: E402


def main(model_name: str, loop: str):
    cfg = {"name": model_name}
    if model_name == "convnet":
        cfg.update(width=8, depth=2, norm="batch")
    model = create_model(ml_collections.ConfigDict(cfg), num_classes=10)
    x = jax.random.normal(jax.random.key(0), (128, 8, 8, 1))
    y = jax.random.randint(jax.random.key(1), (128,), 0, 10)
    v = init_variables(model, jax.random.key(2), (8, 8, 1))
    mask = masks.prune(masks.magnitude_scores(v["params"]), masks.ones_like(v["params"]), 0.5)
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9))
    out = {}
    for name, mesh in (("single", None), ("mesh", Mesh(np.array(jax.devices()), ("data",)))):
        xs, ys = x, y
        if mesh is not None:
            rep = NamedSharding(mesh, P())
            xs, ys = jax.device_put(x, rep), jax.device_put(y, rep)
        tr = train.Trainer(model, tx, batch_size=32, num_train=128, loop=loop, mesh=mesh)
        state, _ = tr.train(train.create_state(v, mask, tx), xs, ys, jax.random.key(3), 12)
        out[name] = (state, tr.evaluate(state.params, state.batch_stats, state.mask, xs, ys))
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree.leaves(out["single"][0].params), jax.tree.leaves(out["mesh"][0].params)))
    print(json.dumps({"devices": jax.device_count(), "max_param_diff": diff,
                      "acc_single": out["single"][1]["accuracy"],
                      "acc_mesh": out["mesh"][1]["accuracy"]}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
