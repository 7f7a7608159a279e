"""Stage 2 data: capsules precomputed once by the frozen encoder, stored as memory-mapped `.npy`.

    folder/
      manifest.json            encoder fingerprint, block size, width, and per split the files
      train.capsules.npy       float32 [windows, seq_len / K, D]  (np.load(mmap_mode="r"))
      train.mask.npy           uint8   [windows, seq_len / K]      1 = the block holds a real token
      validation.capsules.npy, validation.mask.npy

The fingerprint is the SHA-256 of everything that determines a capsule: the token
embeddings, every encoder parameter (capsule head included), the block size and the
capsule kind. `load_capsules` recomputes it from the model it is given and refuses capsules
written by any other encoder (stale capsules would silently train the reasoner on the
wrong targets).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

MANIFEST = "manifest.json"
FORMAT = "strata-hmtr-capsules/1"


def encoder_fingerprint(model) -> str:
    """SHA-256 (hex) of the token embeddings, the encoder's parameters and the capsule settings."""
    base = model.model if hasattr(model, "model") else model
    c = base.config
    h = hashlib.sha256()
    h.update(json.dumps({"block_size": c.block_size, "capsule": c.capsule, "hidden_size": c.hidden_size}).encode())
    named = [("embed_tokens.weight", base.embed_tokens.weight)]
    named += [(f"encoder.{n}", p) for n, p in base.encoder.named_parameters()]
    for name, tensor in sorted(named, key=lambda item: item[0]):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def block_mask(labels: torch.Tensor, block_size: int) -> torch.Tensor:
    """(N, L) labels -> (N, L / K) uint8: 1 where a block holds at least one scored token."""
    return (labels.view(labels.shape[0], -1, block_size) != -100).any(-1).to(torch.uint8)


@torch.no_grad()
def precompute_capsules(model, windows, folder: str | os.PathLike, split: str, batch_size: int = 64,
                        progress: bool = False) -> Path:
    """Encode every window (a Dataset of ``input_ids``/``labels`` rows of equal length) with the
    model's encoder and write ``split`` to ``folder`` (the manifest is created or extended)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = model.model if hasattr(model, "model") else model
    K, D = base.config.block_size, base.config.hidden_size
    was_training = base.training
    base.eval()
    n = len(windows)
    if n == 0:
        raise ValueError(f"no windows to encode for split {split!r}")
    first = windows[0]["input_ids"]
    L = len(first)
    if L % K:
        raise ValueError(f"windows of {L} tokens are not a multiple of block_size={K}")
    fingerprint = encoder_fingerprint(model)
    cap_file, mask_file = f"{split}.capsules.npy", f"{split}.mask.npy"
    caps = np.lib.format.open_memmap(folder / cap_file, mode="w+", dtype=np.float32, shape=(n, L // K, D))
    masks = np.lib.format.open_memmap(folder / mask_file, mode="w+", dtype=np.uint8, shape=(n, L // K))
    device = next(base.parameters()).device
    for start in range(0, n, batch_size):
        rows = windows[start : start + batch_size]
        ids = torch.as_tensor(rows["input_ids"]).to(device)
        labels = torch.as_tensor(rows["labels"])
        caps[start : start + len(ids)] = base.encode_capsules(ids).float().cpu().numpy()
        masks[start : start + len(ids)] = block_mask(labels, K).numpy()
        if progress:
            print(f"\r{split}: {min(n, start + batch_size)}/{n} windows", end="", flush=True)
    if progress:
        print()
    caps.flush()
    masks.flush()
    del caps, masks
    manifest_path = folder / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if manifest.get("encoder_sha256") not in (None, fingerprint):
        manifest = {}  # written by another encoder: its other splits are stale too
    manifest.update(format=FORMAT, encoder_sha256=fingerprint, block_size=K, hidden_size=D,
                    capsule=base.config.capsule)
    manifest.setdefault("splits", {})[split] = {"capsules": cap_file, "mask": mask_file, "windows": n,
                                                "capsules_per_window": L // K}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    if was_training:
        base.train()
    return folder


class CapsuleDataset(torch.utils.data.Dataset):
    """Rows ``{"capsules": (n, D) float32, "capsule_mask": (n,) long}`` read from memory-mapped files."""

    def __init__(self, capsules: np.ndarray, mask: np.ndarray):
        self.capsules, self.mask = capsules, mask

    def __len__(self) -> int:
        return self.capsules.shape[0]

    def __getitem__(self, i):
        return {"capsules": torch.from_numpy(np.array(self.capsules[i])),
                "capsule_mask": torch.from_numpy(np.array(self.mask[i], dtype=np.int64))}


def load_capsules(folder: str | os.PathLike, model, split: str) -> CapsuleDataset:
    """The capsules of ``split``, memory-mapped; refused unless ``model``'s encoder wrote them."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no capsule manifest ({MANIFEST}); run precompute_capsules first")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown capsule format {manifest.get('format')!r} (expected {FORMAT!r})")
    expected = encoder_fingerprint(model)
    if manifest.get("encoder_sha256") != expected:
        raise ValueError(
            f"stale capsules in {folder}: they were written by an encoder with SHA-256 "
            f"{str(manifest.get('encoder_sha256'))[:12]}..., the model's encoder is {expected[:12]}...; "
            "recompute them with precompute_capsules"
        )
    if split not in manifest.get("splits", {}):
        raise ValueError(f"{folder} has no capsules for split {split!r}; it has {sorted(manifest.get('splits', {}))}")
    entry = manifest["splits"][split]
    capsules = np.load(folder / entry["capsules"], mmap_mode="r")
    mask = np.load(folder / entry["mask"], mmap_mode="r")
    return CapsuleDataset(capsules, mask)
