"""Tickets carry a SHA-256 digest of their content: a ticket re-packed with a changed weight, NaN
weights, a mask that disagrees with its zeros or an edited accuracy is refused on load with a
one-line error naming the file; a genuine ticket loads and round-trips."""

import json
import re

import jax
import numpy as np
import pytest

from dp_jax.tasks import export
from dp_jax.tasks import prune as experiment
from dp_jax.tasks import settings as settings_lib

from conftest import load_config_module


@pytest.fixture(scope="module")
def ticket(toy_npz, tmp_path_factory):
    """``(path, (meta, sections))``: round 1 of IMP on the toy data, exported to a file."""
    c = load_config_module("fashion_mnist").get_config("smoke")
    c.data.name = f"npz:{toy_npz}"
    c.data.train_size = 0
    c.train.batch_size = 40
    c.train.eval_batch_size = 64
    c.prune.rounds = 1
    c.prune.method = "imp"
    wd = str(tmp_path_factory.mktemp("wd"))
    experiment.run(c, wd)
    setup = export.rebuild_setup(settings_lib.from_workdir(wd)[0])
    path = str(tmp_path_factory.mktemp("tickets") / "ticket.npz")
    export.export_ticket(wd, "imp_k0", 0, 1, path, setup=setup)
    return path, export.build_ticket(wd, "imp_k0", 0, 1, setup=setup)


def _read(path):
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    return json.loads(str(arrays.pop(export.META))), arrays


def _write(path, meta, arrays, *, redigest=False):
    """Re-pack a ticket; ``redigest``: with a digest of the new content (a careful forger), so
    that the checks behind the digest are exercised too."""
    if redigest:
        meta = dict(meta, **{export.DIGEST: export.content_digest(meta, arrays)})
    np.savez(path, **{export.META: np.array(json.dumps(meta))}, **arrays)
    return str(path)


def _pruned(meta, arrays):
    """A kernel and the flat index of one of its pruned entries."""
    for k in meta["arrays"]["mask"]:
        off = np.flatnonzero(~arrays[f"mask/{k}"])
        if off.size:
            return k, off[0]
    raise AssertionError("round 1 prunes nothing")


def _changed_weight(meta, arrays):
    k = meta["arrays"]["trained/params"][0]
    w = arrays[f"trained/params/{k}"].copy()
    w.flat[np.flatnonzero(w)[0]] *= 1.001
    arrays[f"trained/params/{k}"] = w
    return meta, arrays


def _nan_trained(meta, arrays):
    k = meta["arrays"]["trained/params"][-1]
    arrays[f"trained/params/{k}"] = np.full_like(arrays[f"trained/params/{k}"], np.nan)
    return meta, arrays


def _inf_init(meta, arrays):
    k = meta["arrays"]["init/params"][0]
    w = arrays[f"init/params/{k}"].copy()
    w.flat[3] = np.inf
    arrays[f"init/params/{k}"] = w
    return meta, arrays


def _mask_off_a_live_weight(meta, arrays):
    k = meta["arrays"]["mask"][0]
    m = arrays[f"mask/{k}"].copy()
    m.flat[np.flatnonzero(m & (arrays[f"trained/params/{k}"] != 0))[0]] = False
    arrays[f"mask/{k}"] = m
    return meta, arrays


def _weight_where_pruned(meta, arrays):
    k, i = _pruned(meta, arrays)
    w = arrays[f"trained/params/{k}"].copy()
    w.flat[i] = 0.5
    arrays[f"trained/params/{k}"] = w
    return meta, arrays


def _edited_accuracy(meta, arrays):
    meta = json.loads(json.dumps(meta))
    acc = meta["record"]["test_accuracy"]
    meta["record"]["test_accuracy"] = acc + 0.05 if acc < 0.9 else acc - 0.05
    return meta, arrays


def _edited_digest(meta, arrays):
    return dict(meta, **{export.DIGEST: "0" * 64}), arrays


# (edit, whether a recomputed digest hides it, what the refusal says)
CASES = {
    "changed weight": (_changed_weight, True, "damaged or edited"),
    "NaN trained weights": (_nan_trained, False, r"trained/params/\S+ has non-finite values"),
    "inf in init weights": (_inf_init, False, r"init/params/\S+ has non-finite values"),
    "mask off under a live weight": (_mask_off_a_live_weight, False,
                                     "nonzero where its mask is 0"),
    "weight where the mask is 0": (_weight_where_pruned, False, "nonzero where its mask is 0"),
    "edited accuracy": (_edited_accuracy, True, "damaged or edited"),
    "edited digest": (_edited_digest, True, "damaged or edited"),
}


# Each edit as it is, and (unless only the digest can see it) with a recomputed digest.
EDITS = [(c, False) for c in CASES] + [(c, True) for c, (_, only, _) in CASES.items() if not only]


@pytest.mark.parametrize("case,redigest", EDITS,
                         ids=[f"{c}-{'redigested' if r else 'as-is'}" for c, r in EDITS])
def test_edited_ticket_is_refused(ticket, tmp_path, case, redigest):
    edit, _, says = CASES[case]
    meta, arrays = edit(*_read(ticket[0]))
    path = _write(tmp_path / "edited.npz", meta, arrays, redigest=redigest)
    with pytest.raises(ValueError) as e:
        export.load_ticket(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path} is not a valid dp_jax ticket: ")
    # Without a new digest every edit shows first as a content mismatch.
    assert re.search("damaged or edited" if not redigest else says, msg), msg


def test_bit_flips_in_the_file_are_refused(ticket, tmp_path):
    """Anywhere in the compressed file: zip/zlib errors or the digest, never a quiet load."""
    data = open(ticket[0], "rb").read()
    step = max(1, len(data) // 37)
    for n, at in enumerate(range(0, len(data), step)):
        raw = bytearray(data)
        raw[at] ^= 0x01
        path = tmp_path / f"flip_{n}.npz"
        path.write_bytes(bytes(raw))
        try:
            export.load_ticket(str(path))
        except ValueError as e:
            assert str(path) in str(e) and "\n" not in str(e)
        else:  # a flip in zip padding or a header field no reader looks at changes no content
            t, ref = export.load_ticket(str(path)), export.load_ticket(ticket[0])
            assert _same(t, ref), f"flip at byte {at} loaded as different content"


def _same(a, b):
    la, lb = jax.tree.leaves((a["mask"], a["init"], a["trained"])), \
        jax.tree.leaves((b["mask"], b["init"], b["trained"]))
    return a["meta"] == b["meta"] and len(la) == len(lb) and all(
        x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb))


def test_genuine_ticket_loads_and_round_trips(ticket, tmp_path):
    path, (meta, sections) = ticket
    t = export.load_ticket(path)
    assert t["meta"][export.DIGEST] == meta[export.DIGEST]
    assert _same(t, export.ticket_objects(json.loads(json.dumps(meta)), sections))
    # Re-packed unchanged (another writer, uncompressed): still genuine.
    m, arrays = _read(path)
    assert export.content_digest(m, arrays) == m[export.DIGEST]
    assert _same(export.load_ticket(_write(tmp_path / "repacked.npz", m, arrays)), t)
    # The digest covers what the checks below it cannot: the record and the config.
    assert export.content_digest(dict(m, seed=m["seed"] + 1), arrays) != m[export.DIGEST]


def test_ticket_without_a_digest_loads_with_a_warning(ticket, tmp_path):
    """Tickets exported before the digest existed: readable, with a warning; the checks that
    need no digest still run."""
    meta, arrays = _read(ticket[0])
    del meta[export.DIGEST]
    old = _write(tmp_path / "old.npz", meta, arrays)
    with pytest.warns(RuntimeWarning, match=r"old\.npz has no content digest"):
        t = export.load_ticket(old)
    assert _same(dict(t, meta=dict(t["meta"], **{export.DIGEST: None})),
                 dict(export.load_ticket(ticket[0]), meta=dict(meta, **{export.DIGEST: None})))
    _, nan = _nan_trained(meta, dict(arrays))
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="non-finite"):
        export.load_ticket(_write(tmp_path / "old_nan.npz", meta, nan))
