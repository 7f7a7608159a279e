"""MT-HOPE's nested learning through the Transformers ``Trainer``.

- ``TwistorNestedLearning`` groups a model's parameters into ``num_nested_levels``
  levels by depth (embedding = level 0, the last layers = the deepest level); level l
  learns at ``lr * factor ** l`` (deeper levels move more slowly). Inside every
  parameter, the entries that read or write the omega half of the twistor stream and
  those of the pi half get their own learning rates (``lr_omega``, ``lr_pi``): the
  seed's separate omega and pi optimizers. It also computes the twistor constraint
  loss, which keeps |omega . pi| near ``constraint_target``.
- ``NestedOptimizer`` is an AdamW over those groups. Each step it (1) skips the update,
  with a log line, when a gradient is not finite; (2) scales each level's learning rate
  by a dynamic weight that depends on training progress (a window moving from the
  shallow levels at the start to the deep ones at the end, mean 1); (3) rescales the
  omega and pi parts of every update. The learning rates in its param groups are the
  ones a scheduler sees, so Trainer's warm-up + cosine schedule applies on top.
- ``NestedTrainer`` is a ``Trainer`` that builds the ``NestedOptimizer``, adds the
  constraint loss, feeds the training progress to the optimizer and skips a batch whose
  loss is not finite (log line, no backward). Gradient accumulation, clipping
  (``max_grad_norm``), bf16 autocast (``bf16=True``) and the schedule
  (``lr_scheduler_type="cosine"``, ``warmup_steps=0.1`` as a ratio) are Trainer's own.
  ``NestedOptimizer`` also works in a plain ``Trainer(optimizers=(opt, None))``, with
  ``NestedProgressCallback`` for the progress.
"""

from __future__ import annotations

import logging
import math

import torch
from transformers import Trainer, TrainerCallback

from strata.modeling.modeling_mt_hope import twistor_constraint_loss

logger = logging.getLogger(__name__)

COMPONENTS = ("omega", "pi")


class TwistorNestedLearning:
    """Parameter levels, omega/pi learning rates and the constraint loss of an MT-HOPE model.

    Args:
        model: an ``MTHopeForCausalLM`` or ``MTHopeModel``.
        lr: base learning rate (level 0).
        num_levels, level_factor: default to the config's ``num_nested_levels`` and
            ``nested_level_factor``.
        lr_omega, lr_pi: multipliers of the omega and pi parts of every update (1.0).
        constraint_weight: weight of the twistor constraint loss.
        weight_decay: AdamW weight decay (not applied to norms, biases and 1-D tensors).
        window: width of the dynamic level-weight window (fraction of the levels).
    """

    def __init__(self, model, lr: float = 1e-3, num_levels: int | None = None, level_factor: float | None = None,
                 lr_omega: float = 1.0, lr_pi: float = 1.0, constraint_weight: float = 0.01,
                 weight_decay: float = 0.0, window: float = 0.35):
        config = model.config
        if getattr(config, "model_type", None) != "mt_hope":
            raise ValueError(f"TwistorNestedLearning needs an MT-HOPE model, got model_type {config.model_type!r}")
        self.model = model
        self.lr = lr
        self.num_levels = num_levels or config.num_nested_levels
        self.level_factor = config.nested_level_factor if level_factor is None else level_factor
        if self.num_levels < 1:
            raise ValueError(f"`num_levels` must be >= 1, got {self.num_levels}")
        if not 0 < self.level_factor <= 1:
            raise ValueError(f"`level_factor` must be in (0, 1], got {self.level_factor}")
        for name, v in (("lr_omega", lr_omega), ("lr_pi", lr_pi)):
            if not v > 0:
                raise ValueError(f"`{name}` must be > 0, got {v}")
        self.lr_omega, self.lr_pi = lr_omega, lr_pi
        self.constraint_weight = constraint_weight
        self.constraint_target = config.constraint_target
        self.weight_decay = weight_decay
        self.window = window
        self.hidden_size = config.hidden_size

    # ------------------------------------------------------------------ levels
    def depth_units(self) -> list[str]:
        """Parameter-name prefixes in the order data flows through them (depth 0 first)."""
        m = self.model
        prefix = "model." if hasattr(m, "model") else ""
        trunk = m.model if hasattr(m, "model") else m
        units = [f"{prefix}embed_tokens."]
        units += [f"{prefix}layers.{i}." for i in range(len(trunk.layers))]
        if trunk.memory is not None:
            units.append(f"{prefix}memory.")
        if trunk.memory_system is not None:
            units.append(f"{prefix}memory_system.")
        units += [f"{prefix}cms.levels.{i}." for i in range(len(trunk.cms.levels))]
        units.append(f"{prefix}norm.")
        return units

    def level_of(self, name: str) -> int:
        units = self.depth_units()
        if name.startswith("lm_head."):
            return 0  # tied with the embedding
        cms = name.replace("cms.norms.", "cms.levels.")
        for depth, unit in enumerate(units):
            if cms.startswith(unit):
                return min(self.num_levels - 1, depth * self.num_levels // len(units))
        raise ValueError(f"parameter {name!r} belongs to no depth unit of the model")

    def component_dim(self, param: torch.Tensor) -> int | None:
        """The dimension of ``param`` laid out as the twistor stream (omega half, pi half), or None."""
        h = self.hidden_size
        if param.dim() >= 1 and param.shape[0] == h and param.dim() <= 2:
            return 0  # rows write the stream (Linear out = hidden, norms)
        if param.dim() == 2 and param.shape[1] == h:
            return 1  # columns read the stream (Linear in = hidden, embedding rows)
        return None

    def param_groups(self) -> list[dict]:
        """One AdamW group per (level, decay / no decay), with metadata for the optimizer."""
        groups: dict[tuple[int, bool], dict] = {}
        seen = set()
        for name, p in self.model.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            level = self.level_of(name)
            decay = p.dim() >= 2 and "norm" not in name and "embed" not in name
            key = (level, decay)
            if key not in groups:
                groups[key] = {"params": [], "names": [], "component_dims": [], "level": level,
                               "lr": self.lr * self.level_factor**level,
                               "weight_decay": self.weight_decay if decay else 0.0}
            groups[key]["params"].append(p)
            groups[key]["names"].append(name)
            groups[key]["component_dims"].append(self.component_dim(p))
        return [groups[k] for k in sorted(groups)]

    def level_weights(self, progress: float) -> list[float]:
        """Dynamic weight of each level at ``progress`` in [0, 1]: mean 1, peak moving shallow -> deep."""
        progress = min(1.0, max(0.0, float(progress)))
        L = self.num_levels
        if L == 1:
            return [1.0]
        raw = [0.5 + math.exp(-((l / (L - 1) - progress) ** 2) / (2 * self.window**2)) for l in range(L)]
        mean = sum(raw) / L
        return [r / mean for r in raw]

    # ------------------------------------------------------------------ constraint
    def constraint_loss(self, hidden_states) -> torch.Tensor:
        """Twistor constraint over the stream states (embedding and every layer, not the final norm)."""
        states = hidden_states[:-1] if len(hidden_states) > 1 else hidden_states
        return sum(twistor_constraint_loss(h, self.constraint_target) for h in states) / len(states)

    def optimizer(self, **kwargs) -> "NestedOptimizer":
        return NestedOptimizer(self, **kwargs)


class NestedOptimizer(torch.optim.AdamW):
    """AdamW over the nested levels; skips non-finite steps; dynamic level weights; omega/pi rates.

    ``progress`` (0..1, set by ``NestedTrainer`` or ``NestedProgressCallback``) drives the
    level weights. ``skipped_steps`` counts updates skipped for non-finite gradients.
    """

    def __init__(self, nested: TwistorNestedLearning, betas=(0.9, 0.95), eps: float = 1e-8, **kwargs):
        self.nested = nested
        super().__init__(nested.param_groups(), lr=nested.lr, betas=betas, eps=eps, **kwargs)
        self.progress = 0.0
        self.skipped_steps = 0
        self.steps_taken = 0

    def _component_scales(self) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
        n = self.nested
        if n.lr_omega == 1.0 and n.lr_pi == 1.0:
            return []
        out = []
        for group in self.param_groups:
            for p, dim in zip(group["params"], group["component_dims"]):
                if dim is not None and p.grad is not None:
                    half = p.shape[dim] // 2
                    scale = torch.full((p.shape[dim],), n.lr_pi, dtype=p.dtype, device=p.device)
                    scale[:half] = n.lr_omega
                    shape = [1] * p.dim()
                    shape[dim] = -1
                    out.append((p, dim, scale.view(shape)))
        return out

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        bad = [name for group in self.param_groups for p, name in zip(group["params"], group["names"])
               if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        if bad:
            self.skipped_steps += 1
            logger.warning(
                "NestedOptimizer: skipping update %d: non-finite gradients in %d tensors (first: %s)",
                self.steps_taken + self.skipped_steps, len(bad), bad[0])
            for group in self.param_groups:
                for p in group["params"]:
                    p.grad = None
            return loss
        weights = self.nested.level_weights(self.progress)
        saved = [g["lr"] for g in self.param_groups]
        for g in self.param_groups:
            g["lr"] = g["lr"] * weights[g["level"]]
        scaled = self._component_scales()
        before = [p.detach().clone() for p, _, _ in scaled]
        try:
            super().step()
        finally:
            for g, lr in zip(self.param_groups, saved):
                g["lr"] = lr
        for (p, _, scale), old in zip(scaled, before):
            p.copy_(old + (p - old) * scale)
        self.steps_taken += 1
        return loss


def _unwrap(optimizer):
    while optimizer is not None and not isinstance(optimizer, NestedOptimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer if isinstance(optimizer, NestedOptimizer) else None


class NestedProgressCallback(TrainerCallback):
    """Feeds ``global_step / max_steps`` to a NestedOptimizer used in a plain Trainer."""

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        opt = _unwrap(optimizer)
        if opt is not None and state.max_steps:
            opt.progress = state.global_step / state.max_steps


class NestedTrainer(Trainer):
    """``Trainer`` with MT-HOPE's nested learning: NestedOptimizer, constraint loss, non-finite skip.

    Extra arguments: ``nested`` (a TwistorNestedLearning; default: built from the model
    with ``args.learning_rate`` and ``args.weight_decay``). ``skipped_batches`` counts
    batches dropped for a non-finite loss.
    """

    def __init__(self, *args, nested: TwistorNestedLearning | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.nested = nested or TwistorNestedLearning(
            self.model, lr=self.args.learning_rate, weight_decay=self.args.weight_decay)
        self.skipped_batches = 0
        self.last_constraint_loss = None

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = NestedOptimizer(self.nested)
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        opt = _unwrap(self.optimizer)
        if opt is not None and self.state.max_steps:
            opt.progress = self.state.global_step / self.state.max_steps
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weight = self.nested.constraint_weight
        kwargs = {}
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = num_items_in_batch
        outputs = model(**inputs, **kwargs, output_hidden_states=weight > 0)
        loss = outputs.loss
        if weight > 0 and model.training:
            constraint = self.nested.constraint_loss(outputs.hidden_states)
            self.last_constraint_loss = constraint.detach()
            if kwargs:  # the LM loss is already normalised for gradient accumulation; scale alike
                constraint = constraint / self.current_gradient_accumulation_steps
            loss = loss + weight * constraint
        if model.training and not bool(torch.isfinite(loss.detach()).all()):
            self.skipped_batches += 1
            logger.warning("NestedTrainer: skipping batch at step %d: non-finite loss %s",
                           self.state.global_step, loss.detach().float().item())
            loss = torch.zeros((), device=loss.device, dtype=loss.dtype, requires_grad=True)
        return (loss, outputs) if return_outputs else loss
