r"""Writes tests/fixtures/distilled/: small distilled sets as MTT, IDC and npz users have them.

Needs a real torch (only this script does; ``dp_jax.distill.torch_pickle`` reads the files
without it), e.g. the CPU wheel installed into a side directory::

  pip install --no-deps --target /tmp/torch_env torch
  PYTHONPATH=/tmp/torch_env python tests/scripts/make_distilled_fixtures.py

The sets are for conftest's toy dataset (``make_npz``: 8x8x1, 10 classes), 2 stored images per
class, plus one CIFAR-shaped IDC set (``idc_cifar10_smoke.pt``) for the paper config's smoke run. ``expected.npz`` holds what torch itself says the files contain, and IDC's decoding of
``idc_data.pt`` computed by IDC's own ``decode_zoom`` (copied below from snu-mllab/
Efficient-Dataset-Condensation, test.py), so the NumPy importer is checked against torch.
"""

import os
import sys
import tempfile
from math import ceil

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "distilled")
sys.path.insert(0, os.path.join(ROOT, "tests"))

IPC, CLASSES = 2, 10


def decode_zoom(img, target, factor, size=-1):
    """IDC's test.py decode_zoom, verbatim."""
    if size == -1:
        size = img.shape[-1]
    resize = nn.Upsample(size=size, mode='bilinear')

    h = img.shape[-1]
    remained = h % factor
    if remained > 0:
        img = F.pad(img, pad=(0, factor - remained, 0, factor - remained), value=0.5)
    s_crop = ceil(h / factor)
    n_crop = factor**2

    cropped = []
    for i in range(factor):
        for j in range(factor):
            h_loc = i * s_crop
            w_loc = j * s_crop
            cropped.append(img[:, :, h_loc:h_loc + s_crop, w_loc:w_loc + s_crop])
    cropped = torch.cat(cropped)
    data_dec = resize(cropped)
    target_dec = torch.cat([target for _ in range(n_crop)])

    return data_dec, target_dec


def idc_decode(data, target, factor, nclass):
    """IDC's test.py decode: class by class (ipc consecutive images each)."""
    ipc = len(data) // nclass
    xs, ys = zip(*(decode_zoom(data[ipc * c:ipc * (c + 1)], target[ipc * c:ipc * (c + 1)], factor)
                   for c in range(nclass)))
    return torch.cat(xs), torch.cat(ys)


def toy_model_space_images():
    """Real toy training images (IPC per class, class-sorted) in 'standard' model space, NCHW."""
    from conftest import make_npz
    from dp_jax.data import load_dataset
    import types
    with tempfile.TemporaryDirectory() as d:
        path = make_npz(os.path.join(d, "toy.npz"))
        ds = load_dataset(types.SimpleNamespace(name=f"npz:{path}", preprocess="standard"), seed=0)
    idx = np.concatenate([np.flatnonzero(ds.y_train == c)[:IPC] for c in range(CLASSES)])
    return ds.x_train[idx].transpose(0, 3, 1, 2).copy()


def main():
    os.makedirs(OUT, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    expected = {}
    # MTT: distill.py saves image_syn (a leaf requiring grad), label_syn (long) separately.
    images = torch.tensor(toy_model_space_images()).requires_grad_(True)
    labels = torch.arange(CLASSES).repeat_interleave(IPC)
    torch.save(images, os.path.join(OUT, "mtt_images.pt"))
    torch.save(labels, os.path.join(OUT, "mtt_labels.pt"))
    torch.save(torch.tensor(0.02).requires_grad_(True), os.path.join(OUT, "mtt_lr.pt"))
    expected.update(mtt_images=images.detach().numpy(), mtt_labels=labels.numpy())
    # IDC: condense.py saves [synset.data, synset.targets], pixels in [0, 1], NCHW.
    data = torch.rand(CLASSES * IPC, 1, 8, 8, generator=g)
    torch.save([data, labels], os.path.join(OUT, "idc_data.pt"))
    dec, dec_labels = idc_decode(data, labels, 2, CLASSES)
    expected.update(idc_data=data.numpy(), idc_decoded=dec.numpy(),
                    idc_decoded_labels=dec_labels.numpy())
    # Views the reader must rebuild from offset/size/stride, and other storage types.
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    views = {"permuted": x.permute(0, 2, 3, 1), "sliced": x[:, 1:, 1:3, ::2],
             "expanded": x[:1, :1].expand(3, 2, 4, 5), "half": x.half(),
             "double": x.double()[1], "int": x.int(), "bool": x > 50,
             "parameter": nn.Parameter(x[0, 0].clone())}
    torch.save(views, os.path.join(OUT, "views.pt"))
    expected.update({f"views_{k}": v.detach().numpy() for k, v in views.items()})
    # DATM-style soft labels (float N x K) and a legacy (pre-zip) torch file, both refused.
    soft = torch.softmax(torch.randn(CLASSES * IPC, CLASSES, generator=g), dim=1)
    torch.save(soft, os.path.join(OUT, "soft_labels.pt"))
    torch.save(labels, os.path.join(OUT, "legacy_labels.pt"), _use_new_zipfile_serialization=False)
    # A plain npz set: NHWC images in model space, labels, lr.
    np.savez(os.path.join(OUT, "set.npz"), images=expected["mtt_images"].transpose(0, 2, 3, 1),
             labels=labels.numpy().astype(np.int32), lr=np.float32(0.03))
    # An IDC set shaped like CIFAR-10 at the smoke size (3x8x8, 1 stored image per class,
    # factor 2) for configs/cifar10_resnet18.py:paper,smoke under tfds.testing.mock_data.
    g_c = torch.Generator().manual_seed(1)
    torch.save([torch.rand(CLASSES, 3, 8, 8, generator=g_c), torch.arange(CLASSES)],
               os.path.join(OUT, "idc_cifar10_smoke.pt"))
    np.savez(os.path.join(OUT, "expected.npz"), **expected)
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"wrote {len(os.listdir(OUT))} files ({total} bytes) to {OUT} "
          f"with torch {torch.__version__}")


if __name__ == "__main__":
    main()
