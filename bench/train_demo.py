"""Train the shipped demo model: an MLP on scikit-learn's bundled digits (offline, no download).

    python -m sparsedge.bench.train_demo [--out DIR] [--seed 0] [--hidden 1024] [--layers 3]

Needs torch and scikit-learn (training only; ``sparsedge demo`` itself is torch-free).

What it does, exactly:

1. Data: ``sklearn.datasets.load_digits()`` (1797 8x8 images, pixel values 0..16, 10 classes).
   Inputs are scaled to [0, 1] (``x / 16``, float32; this scaling is *outside* the model: the
   shipped test inputs are already scaled). A stratified split (``train_test_split``,
   ``test_size=360``, ``random_state=0``) gives 1437 training and 360 held-out samples.
2. Model: ``64 -> 1024 -> 1024 -> 1024 -> 10``, ReLU between layers, no activation on the
   logits (wide layers so the matrix products, not Python call overhead, dominate run time
   at batch 360).
3. Dense phase: Adam (lr 1e-3, cosine decay, no weight decay), batch 64, ``--epochs`` epochs (default 20),
   inputs augmented with Gaussian pixel noise (std 0.05) and random +-1 pixel shifts.
4. Pruning-aware phase (``--ft-epochs``, default 80, Adam ``--ft-lr`` 1e-3, cosine decay): the loss
   is ``(1 - p) * CE(dense network) + p * CE(same network with every weight matrix
   magnitude-pruned to --sparsity (default 0.9) per layer, unstructured)``, p = ``--pruned-weight``
   (default 0.9) (the mask is
   recomputed from the current weights at every step; gradients of the pruned branch reach
   the kept weights). The shipped weights stay dense: the model is trained so that the
   converter's one-shot magnitude pruning (``--prune 0.9``) keeps its accuracy, which is what
   ``sparsedge demo`` then shows. Biases are never pruned.
5. Output (``--out``, default ``bench/data``):
   * ``digits_mlp.safetensors``: weights and biases as float16 (written by the tiny writer
     below; names ``layers.{i}.weight`` ``[out, in]`` and ``layers.{i}.bias`` ``[out]``,
     i = 0..3, with metadata recording the recipe),
   * ``config.json``: the MLP template config (``sparsedge.loaders.templates``: model_type "mlp",
     layers ``layers.0`` .. ``layers.3``, activation relu, input name ``x``, output ``output``),
   * ``digits_test_x.npy`` float32 ``[360, 64]`` and ``digits_test_y.npy`` int64 ``[360]``,
   * ``train_log.json``: accuracies (float32 dense, float16 dense, 90%-pruned) and settings.

Deterministic on CPU for a given seed and torch version (``torch.use_deterministic_algorithms``).
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / "data"
MODEL_FILE = "digits_mlp.safetensors"
CONFIG_FILE = "config.json"
TEST_X = "digits_test_x.npy"
TEST_Y = "digits_test_y.npy"

_ST_DTYPES = {np.dtype("float16"): "F16", np.dtype("float32"): "F32", np.dtype("int64"): "I64"}


def write_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write ``{name: numpy array}`` as a safetensors file (atomic: temp + fsync + rename).

    Layout: u64 little-endian header length, JSON header (padded with spaces to 8 bytes),
    then the raw little-endian buffers in header order.
    """
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    blobs = []
    for name, a in tensors.items():
        a = np.asarray(a)
        a = a if a.flags.c_contiguous else a.copy(order="C")  # (ascontiguousarray would make 0-d 1-d)
        dt = _ST_DTYPES[a.dtype]
        b = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        off += len(b)
        blobs.append(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_safetensors(path) -> dict:
    """Minimal reader for the files written above (F16/F32/I64): ``{name: numpy array}``."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    inv = {v: k for k, v in _ST_DTYPES.items()}
    out = {}
    for name, d in header.items():
        if name == "__metadata__":
            continue
        b, e = d["data_offsets"]
        out[name] = np.frombuffer(raw, dtype=inv[d["dtype"]].newbyteorder("<"), count=int(np.prod(d["shape"], dtype=np.int64)),
                                  offset=8 + n + b).reshape(d["shape"])
        assert e - b == out[name].nbytes
    return out


def _atomic_save_npy(path: Path, a: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, a, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_split(seed_split: int = 0, test_size: int = 360):
    """The digits split used for training and the shipped test set: (xtr, ytr, xte, yte)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_size, random_state=seed_split, stratify=y)
    return xtr, ytr, xte, yte


def numpy_forward(weights: dict, x: np.ndarray, n_layers: int, sparsity: float = 0.0) -> np.ndarray:
    """Plain numpy logits of the MLP (float32), optionally magnitude-pruned per layer."""
    h = x.astype(np.float32)
    for i in range(n_layers):
        w = weights[f"layers.{i}.weight"].astype(np.float32)
        if sparsity > 0:
            w = magnitude_prune(w, sparsity)
        h = h @ w.T + weights[f"layers.{i}.bias"].astype(np.float32)
        if i < n_layers - 1:
            h = np.maximum(h, 0)
    return h


def magnitude_prune(w: np.ndarray, sparsity: float) -> np.ndarray:
    """Zero the ``round(sparsity * size)`` smallest-magnitude entries (ties broken by order)."""
    k = int(round(sparsity * w.size))
    if k <= 0:
        return w.copy()
    flat = np.abs(w).ravel()
    idx = np.argpartition(flat, k - 1)[:k]
    out = w.copy().ravel()
    out[idx] = 0
    return out.reshape(w.shape)


def train(args) -> dict:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(max(1, args.threads))

    xtr, ytr, xte, yte = load_split()
    dims = [64] + [args.hidden] * args.layers + [10]

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

        def forward(self, x, masks=None):
            for i, lin in enumerate(self.layers):
                w = lin.weight if masks is None else lin.weight * masks[i]
                x = F.linear(x, w, lin.bias)
                if i < len(self.layers) - 1:
                    x = F.relu(x)
            return x

    model = MLP()
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr)
    xe, ye = torch.from_numpy(xte), torch.from_numpy(yte)
    g = torch.Generator().manual_seed(args.seed)

    def augment(xb):
        img = xb.view(-1, 8, 8)
        dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
        img = torch.roll(img, shifts=(dy, dx), dims=(1, 2))
        if dy == 1:
            img[:, 0, :] = 0
        elif dy == -1:
            img[:, -1, :] = 0
        if dx == 1:
            img[:, :, 0] = 0
        elif dx == -1:
            img[:, :, -1] = 0
        img = img + 0.05 * torch.randn(img.shape, generator=g)
        return img.reshape(-1, 64).clamp(0, 1)

    def masks_now():
        ms = []
        for lin in model.layers:
            w = lin.weight.detach().abs().flatten()
            k = int(round(args.sparsity * w.numel()))
            thr = torch.kthvalue(w, k).values if k > 0 else torch.tensor(-1.0)
            ms.append((lin.weight.detach().abs() > thr).float())
        return ms

    def acc(masks=None):
        with torch.no_grad():
            return float((model(xe, masks).argmax(1) == ye).float().mean())

    def run_phase(epochs, lr, pruning_aware):
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
        for ep in range(epochs):
            perm = torch.randperm(len(xt), generator=g)
            tot = 0.0
            for s in range(0, len(xt), args.batch):
                b = perm[s:s + args.batch]
                xb = augment(xt[b])
                loss = F.cross_entropy(model(xb), yt[b])
                if pruning_aware:
                    loss = (1 - args.pruned_weight) * loss + args.pruned_weight * F.cross_entropy(model(xb, masks_now()), yt[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
                tot += float(loss) * len(b)
            sched.step()
            if (ep + 1) % 10 == 0 or ep == epochs - 1:
                print(f"  {'prune-aware' if pruning_aware else 'dense'} epoch {ep + 1}/{epochs}: "
                      f"loss {tot / len(xt):.4f}  test acc dense {acc():.4f}  "
                      f"pruned{int(args.sparsity * 100)} {acc(masks_now()):.4f}", flush=True)

    t0 = time.time()
    print(f"training MLP {dims} on digits: {len(xt)} train / {len(xe)} test samples", flush=True)
    run_phase(args.epochs, 1e-3, False)
    acc_dense_phase1 = acc()
    acc_pruned_phase1 = acc(masks_now())
    run_phase(args.ft_epochs, args.ft_lr, True)
    train_s = time.time() - t0

    weights = {}
    for i, lin in enumerate(model.layers):
        weights[f"layers.{i}.weight"] = lin.weight.detach().numpy().astype(np.float16)
        weights[f"layers.{i}.bias"] = lin.bias.detach().numpy().astype(np.float16)
    n = len(dims) - 1
    log = {
        "dims": dims, "seed": args.seed, "epochs": args.epochs, "ft_epochs": args.ft_epochs,
        "sparsity": args.sparsity, "pruned_weight": args.pruned_weight, "ft_lr": args.ft_lr, "batch": args.batch, "train_samples": int(len(xt)), "test_samples": int(len(xe)),
        "train_seconds": round(train_s, 1), "torch": torch.__version__,
        "acc_after_dense_phase": acc_dense_phase1, "acc_after_dense_phase_pruned": acc_pruned_phase1,
        "acc_float32": acc(),
        "acc_float16_dense": float((numpy_forward(weights, xte, n).argmax(1) == yte).mean()),
        "acc_float16_pruned": float((numpy_forward(weights, xte, n, args.sparsity).argmax(1) == yte).mean()),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"source": "sparsedge.bench.train_demo", "dataset": "sklearn.datasets.load_digits",
            "recipe": json.dumps({k: log[k] for k in ("dims", "seed", "epochs", "ft_epochs", "sparsity")})}
    write_safetensors(out / MODEL_FILE, weights, meta)
    # the MLP template's config (sparsedge.loaders.templates): Linear layers in order, ReLU between
    config = {"model_type": "mlp", "layers": [f"layers.{i}" for i in range(n)], "activation": "relu",
              "final_activation": "none", "input_name": "x",
              "about": f"digits MLP {dims}, inputs x/16 in [0, 1]; trained by sparsedge.bench.train_demo"}
    tmp = out / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, out / CONFIG_FILE)
    _atomic_save_npy(out / TEST_X, np.ascontiguousarray(xte, dtype=np.float32))
    _atomic_save_npy(out / TEST_Y, np.ascontiguousarray(yte, dtype=np.int64))
    tmp = out / "train_log.json.tmp"
    tmp.write_text(json.dumps(log, indent=2) + "\n")
    os.replace(tmp, out / "train_log.json")
    return log


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparsedge.bench.train_demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(DATA_DIR))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=3, help="number of hidden layers")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--ft-epochs", type=int, default=80)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--pruned-weight", type=float, default=0.9,
                   help="weight of the pruned branch's loss in the pruning-aware phase")
    p.add_argument("--ft-lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    log = train(args)
    print(json.dumps(log, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
