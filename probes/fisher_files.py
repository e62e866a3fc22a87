"""The Fisher probe's files: ``<stem>.npz`` (the blocks, their exactness, each row's metadata,
the c_j), ``<stem>_top.json`` (the training sequences that raised and lowered the entropy most,
with their text) and the cosine heatmap (``<stem>.png``, and the probe's TensorBoard image)."""

from __future__ import annotations

import json

import numpy as np
import torch

META = ("rank", "kind", "prompt", "reward", "advantage", "length")  # the columns of meta_e / meta_u


def cosine(K: torch.Tensor) -> torch.Tensor:
    d = K.diagonal().clamp(min=1e-300).sqrt()
    return K / d[:, None] / d[None, :]


def heatmap(res: dict) -> np.ndarray:
    """[H, W, 3] uint8: cos(∇S_t, ∇S_t') over E then U rows, each sorted by prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = res["meta"]
    order = [int(i) for idx in (res["E"], res["U"]) for i in idx[meta[idx, 2].argsort(stable=True)]]
    C = cosine(res["K"][order][:, order]).numpy()
    fig, ax = plt.subplots(figsize=(5, 4.4), dpi=100)
    im = ax.imshow(C, cmap="RdBu_r", vmin=-1, vmax=1)
    n_e = len(res["E"])
    if n_e and len(res["U"]):
        for f in (ax.axhline, ax.axvline):
            f(n_e - 0.5, color="k", lw=0.8)
    ax.set_title(f"cos(∇log π) — E: first {n_e}, then U ({len(res['U'])})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return img


def write_results(folder, stem: str, res: dict) -> None:
    """<stem>.npz (blocks, exactness, per-row metadata, c_j), <stem>_top.json (the training
    sequences that raised / lowered the entropy most, with their text), <stem>.png (heatmap)."""
    folder.mkdir(parents=True, exist_ok=True)
    K, exact, meta, E, U, contrib = (res[k] for k in ("K", "exact", "meta", "E", "U", "contrib"))
    texts = res["texts"]
    np.savez_compressed(
        folder / f"{stem}.npz", K_ee=K[E][:, E].numpy(), K_uu=K[U][:, U].numpy(), K_eu=K[E][:, U].numpy(),
        exact_ee=exact[E][:, E].numpy(), exact_uu=exact[U][:, U].numpy(), exact_eu=exact[E][:, U].numpy(),
        meta_e=meta[E].numpy(), meta_u=meta[U].numpy(), meta_columns=np.array(META), contrib=contrib.numpy(),
        u_ids=np.array([t.split("\t", 1)[0] for t in texts]))
    order = contrib.argsort(descending=True).tolist()

    def row(j: int) -> dict:
        rid, _, text = texts[j].partition("\t")
        return {"id": rid, "c": float(contrib[j]), "advantage": float(meta[U[j], 4]), "reward": float(meta[U[j], 3]),
                "length": int(meta[U[j], 5]), "text": text}

    top = {"raising": [row(j) for j in order[:5] if contrib[j] > 0],
           "lowering": [row(j) for j in reversed(order[-5:]) if contrib[j] < 0]}
    (folder / f"{stem}_top.json").write_text(json.dumps(top, indent=1))
    import matplotlib.image

    matplotlib.image.imsave(folder / f"{stem}.png", heatmap(res))
