"""``eupe teachers train``: a small teacher zoo trained here, for recipes whose teachers cannot be downloaded.

Distilling randomly initialised teachers runs every code path but transfers nothing. Each teacher of the
recipe with a ``train:`` block is trained briefly, with the timm model exactly as the recipe builds it (width,
patch size, resolution, summary vector), on the labelled images of ``--data`` (``eupe data synth --dense``:
classes, segmentation masks, depth), each for a different thing, as the paper's teachers are:

* ``semantic`` (the PEcore role): image classes, a linear head on the summary vector (cross-entropy);
* ``contrastive`` (the PElang role): the summary vector, projected, matched by cosine to a learned embedding
  of each class name, CLIP-style with the class names as captions (InfoNCE over the classes);
* ``dense`` (the DINOv3 role): per-patch segmentation classes (a linear head on the patch tokens, logits
  upsampled to the mask) and depth (a linear head regressing each cell's mean depth).

Every image but evaluation's held-out ones (``eupe.evaluate.data.recipe_split``) is seen: the held-out images
stay held out for every table. ``<out>/<teacher>.safetensors`` holds the encoder alone (``num_classes=0``, the
format ``weights:`` loads); the heads stay in ``<out>/checkpoints/<teacher>.safetensors`` (``encoder.*`` and
``head.*``), which ``--resume`` reuses for teachers a killed run had finished.
``result.json`` records each teacher's own held-out numbers on its objective (accuracy, mIoU, depth RMSE).
A recipe with no ``train:`` teacher trains nothing (a quick no-op).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_bytes, save
from torch import nn

from eupe import storage
from eupe.config import Config, TeacherSpec
from eupe.errors import EupeError
from eupe.fingerprint import data_inputs, fingerprint
from eupe.progress import progress
from eupe.step import StepRun
from eupe.teachers.zoo import zoo

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
SEG_LABEL_SIZE = 32  # masks compared at 32 x 32 while training (the probe's label_size is for evaluation)


# --------------------------------------------------------------------------- data


def _load(cfg: Config, size: int, need: set[str], most: int):
    """The training (at most ``most``: no teacher sees more) and held-out images (uint8, ``size`` px, centre
    crops), their classes, masks and depth."""
    from torch.utils.data import DataLoader

    from eupe.evaluate.data import EvalImages, Split, available_labels, open_image_folder, recipe_split

    source = open_image_folder(cfg.data.root, "the teacher zoo")
    sp = recipe_split(len(source), cfg)
    held = set(sp.heldout)  # every image evaluation does not hold out (eval.max_images caps the probes, not these)
    rest = [i for i in torch.randperm(len(source), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
            if i not in held]
    sp = Split(train=sorted(rest[:most]), heldout=sp.heldout)
    labels = available_labels(source, sp.train + sp.heldout)
    for kind in ("mask", "depth"):
        if kind in need and not labels[kind]:
            raise EupeError(f"teachers: a dense teacher trains on segmentation masks and depth, but {cfg.data.root} "
                            f"has no .{kind}.png labels (eupe data synth --dense writes them)")
    parts = {}
    for name, indices in (("train", sp.train), ("heldout", sp.heldout)):
        data = EvalImages(source, indices, size, size, labels)
        loader = DataLoader(data, batch_size=64, num_workers=min(cfg.data.num_workers, 2))
        batches = list(loader)
        part = {k: torch.cat([b[k] for b in batches]) for k in ("image", "mask", "depth") if k in batches[0]}
        part["label"] = torch.cat([torch.as_tensor(b["label"]) for b in batches])
        parts[name] = part
    if "class" in need:
        y = torch.cat([parts["train"]["label"], parts["heldout"]["label"]])
        if bool((y < 0).any()) or len(y.unique()) < 2:
            raise EupeError(f"teachers: a semantic teacher trains on image classes, but the images of {cfg.data.root} "
                            "are not in class folders (need at least 2 classes)")
    return parts


def _augment(batch: dict, g: torch.Generator) -> dict:
    """One random crop (0.85-1 of the side: the labelled object stays in) and a horizontal flip for the whole
    batch, labels alike."""
    side = batch["image"].shape[-1]
    crop = int(side * (0.85 + 0.15 * float(torch.rand((), generator=g))))
    top, left = (int(torch.randint(0, side - crop + 1, (), generator=g)) for _ in range(2))
    flip = bool(torch.rand((), generator=g) < 0.5)
    out = {}
    for k, v in batch.items():
        if v.ndim >= 3:
            v = v[..., top : top + crop, left : left + crop]
            v = v.flip(-1) if flip else v
        out[k] = v
    return out


# --------------------------------------------------------------------------- heads and losses


class Heads(nn.Module):
    def __init__(self, objective: str, cls_dim: int, patch_dim: int, num_classes: int, seg_classes: int):
        super().__init__()
        self.objective = objective
        if objective == "semantic":
            self.classify = nn.Linear(cls_dim, num_classes)
        elif objective == "contrastive":
            self.project = nn.Linear(cls_dim, 64)
            self.classes = nn.Parameter(torch.randn(num_classes, 64) * 0.02)  # the class names' "text" embeddings
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        else:
            self.norm = nn.LayerNorm(patch_dim)
            self.seg = nn.Linear(patch_dim, seg_classes)
            self.depth = nn.Linear(patch_dim, 1)

    def class_logits(self, cls: torch.Tensor) -> torch.Tensor:
        if self.objective == "semantic":
            return self.classify(cls)
        z, c = F.normalize(self.project(cls), dim=-1), F.normalize(self.classes, dim=-1)
        return self.logit_scale.clamp(max=math.log(100)).exp() * z @ c.T

    def dense(self, patches: torch.Tensor, grid: tuple[int, int], size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Segmentation logits [B, K, size, size] and depth per cell [B, h, w] (metres)."""
        x = self.norm(patches)
        seg = self.seg(x).transpose(1, 2).reshape(x.shape[0], -1, *grid)
        seg = F.interpolate(seg, size=(size, size), mode="bilinear", align_corners=False)
        return seg, self.depth(x)[..., 0].reshape(x.shape[0], *grid)


def _cell_depth(depth: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    from eupe.evaluate.probes import _pool_to_grid

    return _pool_to_grid(depth, grid)


def _fit_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(mask[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()


def _forward(model, heads: Heads, batch: dict, size: int, mean, std, ignore: int):
    from eupe.distill.targets import prepare_for
    from eupe.models.features import extract_features

    f = extract_features(model, prepare_for(model, batch["image"], size, mean, std))
    if heads.objective != "dense":
        logits = heads.class_logits(f.cls)
        return {"loss": F.cross_entropy(logits, batch["label"]), "logits": logits}
    label = min(SEG_LABEL_SIZE, batch["mask"].shape[-1])
    seg, depth = heads.dense(f.patches, f.grid, label)
    mask = _fit_mask(batch["mask"], label)
    target, valid = _cell_depth(batch["depth"].float(), f.grid)
    depth_loss = F.smooth_l1_loss(depth[valid], target[valid]) if bool(valid.any()) else depth.sum() * 0
    seg_loss = F.cross_entropy(seg, mask, ignore_index=ignore)
    return {"loss": seg_loss + depth_loss, "seg": seg, "mask": mask, "depth": depth, "target": target, "valid": valid,
            "seg_loss": seg_loss, "depth_loss": depth_loss}


# --------------------------------------------------------------------------- one teacher


def _train_one(cfg: Config, index: int, spec: TeacherSpec, parts: dict, device: torch.device) -> tuple[dict, dict, dict]:
    """The encoder's state, the heads' state and the teacher's own numbers."""
    from eupe.distill.targets import model_inputs
    from eupe.models.features import feature_dims
    from eupe.models.registry import build_model

    t = spec.train
    train, held = parts["train"], parts["heldout"]
    num_classes = int(torch.cat([train["label"], held["label"]]).max()) + 1
    ignore = cfg.eval.ignore_index
    seg_classes = 1
    if "mask" in train:
        both = torch.cat([train["mask"].flatten(), held["mask"].flatten()])
        seg_classes = int(both[both != ignore].max()) + 1
    torch.manual_seed(cfg.seed * 1000 + 900 + index)
    model = build_model(spec.model_copy(update={"weights": None}), f"teachers.{index}").to(device)
    cls_dim, patch_dim = feature_dims(model, spec.img_size)
    heads = Heads(t.objective, cls_dim, patch_dim, num_classes, seg_classes).to(device)
    mean, std = model_inputs(model, device)
    params = [p for p in [*model.parameters(), *heads.parameters()] if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=t.lr)
    warmup = max(1, t.iters // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / t.iters))))
    g = torch.Generator().manual_seed(cfg.seed * 1000 + 900 + index)
    n = train["image"].shape[0]
    losses, t0 = [], time.perf_counter()
    model.train()
    heads.train()
    perm, pos = torch.randperm(n, generator=g), 0
    used = ("image", "label") if t.objective != "dense" else ("image", "mask", "depth")  # what _forward reads
    bar = progress(total=t.iters, desc=f"teacher {spec.name}", unit="step")
    for _ in range(t.iters):
        if pos + t.batch_size > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos : pos + t.batch_size]
        pos += t.batch_size
        batch = _augment({k: train[k][idx] for k in used}, g)
        batch = {k: v.to(device) for k, v in batch.items()}
        out = _forward(model, heads, batch, spec.img_size, mean, std, ignore)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(out["loss"].detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.update(1)
    bar.close()
    wall = time.perf_counter() - t0
    numbers = {"objective": t.objective, "iters": t.iters, "first_loss": sum(losses[:10]) / len(losses[:10]),
               "last_loss": sum(losses[-10:]) / len(losses[-10:]), "wall_s": wall,
               "images_per_s": t.iters * t.batch_size / max(wall, 1e-9),
               **_heldout(model, heads, held, spec.img_size, mean, std, ignore, seg_classes, device)}
    log.info("teacher %s (%s, %s): %s", spec.name, t.objective, spec.model,
             {k: round(v, 4) if isinstance(v, float) else v for k, v in numbers.items()})
    return model.state_dict(), heads.state_dict(), numbers


@torch.inference_mode()
def _heldout(model, heads: Heads, held: dict, size: int, mean, std, ignore: int, seg_classes: int, device) -> dict:
    """The teacher's own numbers on the held-out images, with its own heads."""
    from eupe.evaluate.probes import miou

    model.eval()
    heads.eval()
    correct = count = 0
    preds, masks, sq, cells = [], [], 0.0, 0
    for start in range(0, held["image"].shape[0], 64):
        batch = {k: v[start : start + 64].to(device) for k, v in held.items()}
        out = _forward(model, heads, batch, size, mean, std, ignore)
        if heads.objective != "dense":
            correct += int((out["logits"].argmax(-1) == batch["label"]).sum())
            count += len(batch["label"])
        else:
            preds.append(out["seg"].argmax(1).cpu())
            masks.append(out["mask"].cpu())
            v = out["valid"]
            sq += float(((out["depth"][v] - out["target"][v]) ** 2).sum())
            cells += int(v.sum())
    if heads.objective != "dense":
        return {"heldout_accuracy": correct / max(count, 1)}
    score, _ = miou(torch.cat(preds), torch.cat(masks), seg_classes, ignore)
    return {"heldout_miou": score, "heldout_depth_rmse": math.sqrt(sq / max(cells, 1))}


# --------------------------------------------------------------------------- the step


def _teacher_key(fp: dict, spec: TeacherSpec) -> str:
    """What one teacher's training depends on: the step's inputs and code, and its own spec."""
    record = {"inputs": fp.get("inputs"), "code": fp.get("code"), "spec": spec.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _resumed(out: str, name: str, key: str) -> tuple[dict, dict] | None:
    uri = f"{out.rstrip('/')}/{CHECKPOINTS}/{name}.safetensors"
    if not storage.exists(uri):
        return None
    try:
        from safetensors import safe_open

        path = storage.local_copy(uri)
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("key") != key:
            log.info("teacher %s: its checkpoint was trained from other inputs: training again", name)
            return None
        state = load_bytes(Path(path).read_bytes())
        return state, json.loads(meta["numbers"])
    except Exception as e:  # noqa: BLE001 - a half-written or foreign file: train again
        log.warning("teacher %s: cannot reuse %s (%s): training again", name, uri, e)
        return None


def run_teachers(cfg: Config, out: str | Path, resume: bool | str = False) -> dict:
    out = str(out)
    teachers = zoo(cfg)
    if not teachers:  # a recipe of real teachers (hub or weights files): nothing to train, nothing read
        run = StepRun(out, "teachers", fingerprint("teachers", {}, cfg))
        if run.done:
            return run.done
        with run.staging():
            pass
        return run.finish({"trained": [], "note": "no teacher of the recipe has a train: block"}, {})
    fp = fingerprint("teachers", data_inputs(cfg.data), cfg)
    need = {"class" if t.train.objective != "dense" else "mask" for _, t in teachers}
    if "mask" in need:
        need.add("depth")
    size = max(t.img_size for _, t in teachers)

    def check() -> tuple[float, dict, float]:  # data without the labels a teacher trains on fails before --out is
        # touched: (when loading began, the images, the seconds it took)
        start = time.perf_counter()
        parts = _load(cfg, size, need, max(t.train.iters * t.train.batch_size for _, t in teachers))
        return start, parts, time.perf_counter() - start

    run = StepRun(out, "teachers", fp, check=check)
    if run.done:
        return run.done
    from eupe.distill.checkpoint import tensors_for_disk
    from eupe.distill.runtime import setup, teardown

    t0, parts, load_s = run.checked
    rt = setup(cfg)
    per_teacher, states = {}, {}
    try:
        for i, spec in teachers:
            key = _teacher_key(fp, spec)
            reused = _resumed(out, spec.name, key) if resume else None
            if reused is not None:
                state, numbers = reused
                log.info("teacher %s: resumed (trained by an earlier run of this step)", spec.name)
            else:
                encoder, head, numbers = _train_one(cfg, i, spec, parts, rt.device)
                state = {**{f"encoder.{k}": v for k, v in encoder.items()}, **{f"head.{k}": v for k, v in head.items()}}
                run.claim()
                storage.write_bytes(f"{out.rstrip('/')}/{CHECKPOINTS}/{spec.name}.safetensors",
                                    save(tensors_for_disk(state), metadata={"key": key, "numbers": json.dumps(numbers)}))
            states[spec.name] = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
            per_teacher[spec.name] = {"model": spec.model, "img_size": spec.img_size, **numbers}
    finally:
        teardown()
    with run.staging() as tmp:
        for name, state in states.items():
            storage.write_bytes(str(tmp / f"{name}.safetensors"), save(tensors_for_disk(state)))
    metrics = {"trained": [t.name for _, t in teachers], "teachers": per_teacher, "load_s": load_s,
               "num_train": int(parts["train"]["image"].shape[0]), "num_heldout": int(parts["heldout"]["image"].shape[0]),
               "wall_s": time.perf_counter() - t0}
    for name, numbers in per_teacher.items():  # flat too: the step's metrics on the Pushgateway
        for k in ("heldout_accuracy", "heldout_miou", "heldout_depth_rmse"):
            if k in numbers:
                metrics[f"{name}.{k}"] = numbers[k]
    return run.finish(metrics, {t.name: run.path(f"{t.name}.safetensors") for _, t in teachers})
