"""The MLP VAE's training step with its gradients written out by hand (CPU, fp32).

Same loss, same gradients, same Adam update as the autograd step (up to rounding); only how they
are computed differs. On a small MLP, autograd's bookkeeping, the separate element-wise passes of the loss and
its derivative, and one Adam kernel per tensor take as long as the matrix multiplies themselves.
Here every multiply runs through the faster library of the CPU (`fastpath.matmul`: oneDNN
with the ReLU fused into the forward ones where it runs AVX-512 at full width, MKL elsewhere), the loss
derivatives are a few whole-batch passes, and `PackedAdam.update` takes the gradients straight
from the multiplies. tests/test_fast_step.py checks the gradients against autograd's.

The derivation holds for one model only, so the step is taken only for it: exactly `VAE` built of
exactly its own blocks (`derived_for`, by class identity, found once when the optimizer is made and
confirmed by identity checks each step). A subclass, whatever it changes (clamped heads, its own
forward, a KL schedule), trains by autograd, and so does a `VAE` with tanh hidden layers
(`activation="tanh"`, found by `linear_layers`): the backward below passes gradients through
ReLUs. The KL weight `beta` is the model's `kl_weight` for the step, passed in, so a weight
changed on the plain `VAE` (its `kl_warmup_steps` included) is honoured here as in autograd. Free bits and IWAE training change the objective itself: with either
set, `VAE` too trains by autograd (`applies`).

The gradients, for a batch of B images x, logits l, posterior (mu, log sigma^2 = v), eps ~ N(0, I)
and z = mu + eps * sigma, of loss = mean_b[BCE(l_b, x_b)] + beta * mean_b[KL_b]:
    dloss/dl  = (sigmoid(l) - x) / B
    dloss/dmu = dloss/dz + beta * mu / B
    dloss/dv  = dloss/dz * eps * sigma / 2 + beta * (exp(v) - 1) / (2B)
and through each linear layer y = a W^T + b: dW = dy^T a, db = sum_b dy, da = dy W.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module
from torch.optim import optimizer as torch_optimizer

from .. import fastpath
from ..fastpath import forward_replaced, matmul, onednn_mm
from ..optim import PackedAdam
from .base import ModelOutput
from .blocks import GaussianHeads, MLPDecoder, MLPEncoderTrunk


class Derivation:
    """What the step was derived for, found in one model once (`derived_for`): its trunk, heads and
    decoder objects, every module inside them with its exact class, and the Linear layers of the
    trunk and the decoder."""

    def __init__(self, trunk: nn.Module, heads: nn.Module, decoder: nn.Module,
                 encoder_layers: list[nn.Linear], decoder_layers: list[nn.Linear]):
        self.parts = (trunk, heads, decoder)
        self.layers = (encoder_layers, decoder_layers)
        self.modules = [m for part in self.parts for m in part.modules()]
        self.classes = [type(m) for m in self.modules]
        self.params = [p for part in self.parts for p in part.parameters()]

    def holds(self, model) -> bool:
        """Whether the model is still what was found: the same parts, and no module's class changed
        (a parametrization such as weight_norm changes it in place) or forward replaced. Identity
        checks only: microseconds a step."""
        return (all(a is b for a, b in zip((model.trunk, model.heads, model.decoder), self.parts))
                and not forward_replaced(model)
                and all(type(m) is c and not forward_replaced(m) for m, c in zip(self.modules, self.classes)))


def linear_layers(seq: nn.Module, final_relu: bool) -> list[nn.Linear] | None:
    """The Linear layers of an nn.Sequential of exactly Linear, ReLU, Linear, ... (ending in a ReLU
    or not, as asked), or None for anything else (subclasses included)."""
    if type(seq) is not nn.Sequential:
        return None
    layers = [m for m in seq if type(m) is nn.Linear]
    expected = [nn.Linear, nn.ReLU] * len(layers)
    if [type(m) for m in seq] != (expected if final_relu else expected[:-1]):
        return None
    return layers


def derived_for(model, vae_class: type) -> Derivation | None:
    """A `Derivation` if `model` is exactly what the gradients above were derived for, else None.

    Exact classes, not a look at the methods: `vae_class` itself (vae.py passes its `VAE`: this
    module cannot import it back), no subclass, whatever it overrides, holding an `MLPEncoderTrunk`,
    `GaussianHeads` and `MLPDecoder` (none a subclass) built of nn.Sequential, nn.Linear and
    nn.ReLU, with no module's forward replaced on the instance. Any
    other model, a VAE subclass whose heads clamp the log-variance included, is trained by autograd.
    """
    if type(model) is not vae_class:
        return None
    trunk, heads, decoder = model.trunk, model.heads, model.decoder
    if (type(trunk) is not MLPEncoderTrunk or type(heads) is not GaussianHeads or type(decoder) is not MLPDecoder
            or type(heads.mu) is not nn.Linear or type(heads.logvar) is not nn.Linear):
        return None
    encoder_layers = linear_layers(trunk.net, final_relu=True)
    decoder_layers = linear_layers(decoder.net, final_relu=False)
    if encoder_layers is None or decoder_layers is None:
        return None
    derivation = Derivation(trunk, heads, decoder, encoder_layers, decoder_layers)
    return derivation if derivation.holds(model) else None


def _has_hooks(derivation: Derivation, model) -> bool:
    """Whether a hook would see the autograd step's tensors (on the model itself or any module or
    weight inside it): the hand step would skip it."""
    if any(getattr(torch_module, name) for name in (
            "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
            "_global_backward_pre_hooks")):
        return True
    return (any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                for m in [model, *derivation.modules])
            or any(p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None) for p in derivation.params))


def _has_step_hooks(optimizer) -> bool:
    """Whether `optimizer.step()` would run a hook (the optimizer's own, or a global one)."""
    return bool(getattr(optimizer, "_optimizer_step_pre_hooks", None)
                or getattr(optimizer, "_optimizer_step_post_hooks", None)
                or getattr(torch_optimizer, "_global_optimizer_pre_hooks", None)
                or getattr(torch_optimizer, "_global_optimizer_post_hooks", None))


def applies(model, x: torch.Tensor, optimizer, derivation: Derivation | None) -> bool:
    """Whether `training_step` computes what the autograd step would here: `derivation` (from
    `derived_for`, once) still holds, the objective is the one derived (BCE + weight * KL: no free
    bits, no importance samples; read each step, as the config is a plain dataclass), the model
    runs in fp32 on the CPU, no autocast and no hooks, and a `PackedAdam` that can take
    the gradients updates it, with no step hook (`PackedAdam.update` is not `step()`, so it would
    skip one: data-parallel training averages the gradients in such a hook, distributed.py)."""
    return (derivation is not None and derivation.holds(model) and not _has_hooks(derivation, model)
            and not _has_step_hooks(optimizer)
            and model.config.free_bits == 0 and model.config.iwae_k == 1
            and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and torch.is_grad_enabled()
            and isinstance(optimizer, PackedAdam) and optimizer.can_update()
            and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in derivation.params))


def weight_grad(dy: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """dW = dy^T a for y = a W^T: (B, out), (B, in) -> (out, in).

    oneDNN reads its left operand row-major, so one side is copied transposed; take the cheaper
    of copying dy^T, or a^T plus the transposed result (returned as a view). MKL reads either."""
    if not fastpath.onednn_faster():
        return torch.mm(dy.t(), a)
    (batch, n_out), n_in = dy.shape, a.shape[1]
    if batch * n_out <= batch * n_in + n_in * n_out:
        return onednn_mm(dy.t(), a.t())  # (out, B) @ (B, in)
    return onednn_mm(a.t(), dy.t()).t()  # ((in, B) @ (B, out))^T


def training_step(model, x: torch.Tensor, optimizer: PackedAdam, derivation: Derivation,
                  beta: float) -> ModelOutput:
    """One Adam step of an MLP VAE on batch x (B, 1, 28, 28) with KL weight `beta` (the model's
    `kl_weight` for this step), where `applies`; returns what `forward` would."""
    encoder, decoder = derivation.layers
    batch, latent = x.shape[0], model.latent_dim
    with torch.no_grad():
        pixels = x.reshape(batch, -1)  # (B, 784)
        # Forward, keeping every layer's input.
        enc_inputs, h = [], pixels
        for layer in encoder:
            enc_inputs.append(h)
            h = matmul(h, layer.weight, layer.bias, "relu")
        heads_w = torch.cat([model.heads.mu.weight, model.heads.logvar.weight])  # (2D, H)
        heads_b = torch.cat([model.heads.mu.bias, model.heads.logvar.bias])
        heads = matmul(h, heads_w, heads_b)  # (B, 2D)
        mu, logvar = heads[:, :latent], heads[:, latent:]
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(mu)  # the draw `reparameterize` makes
        z = torch.addcmul(mu, eps, std)
        dec_inputs, g = [], z
        for i, layer in enumerate(decoder):
            dec_inputs.append(g)
            g = matmul(g, layer.weight, layer.bias, "relu" if i + 1 < len(decoder) else "none")
        logits = g  # (B, 784)

        # The loss, as batch means: BCE(l, x) = softplus(l) - x l, and KL(q || N(0, I)) =
        # 1/2 sum(sigma^2 - log sigma^2 + mu^2 - 1) (Kingma & Welling 2014, Appendix B).
        var = std * std
        recon = (F.softplus(logits).sum() - torch.dot(logits.view(-1), pixels.reshape(-1))) / batch
        kl = (torch.addcmul(var - logvar, mu, mu).sum() - latent * batch) * (0.5 / batch)
        loss = torch.add(recon, kl, alpha=beta)

        # Backward. Bias gradients are summed straight into the buffer the update reads.
        def bias_grad(dy: torch.Tensor, bias: nn.Parameter) -> torch.Tensor:
            slot = optimizer.grad_slot(bias)
            return dy.sum(0) if slot is None else torch.sum(dy, 0, out=slot)

        grads: dict[nn.Parameter, torch.Tensor] = {}
        dy = torch.sigmoid(logits).sub_(pixels).mul_(1.0 / batch)
        for i in reversed(range(len(decoder))):
            layer = decoder[i]
            grads[layer.weight] = weight_grad(dy, dec_inputs[i])
            grads[layer.bias] = bias_grad(dy, layer.bias)
            dy = matmul(dy, layer.weight.t())  # (B, out) @ (out, in)
            if i > 0:  # through the ReLU that produced this layer's input
                dy = torch.ops.aten.threshold_backward(dy, dec_inputs[i], 0)
        dz = dy
        dheads = heads.new_empty(batch, 2 * latent)  # (dloss/dmu, dloss/dlogvar)
        dmu, dlogvar = dheads[:, :latent], dheads[:, latent:]
        torch.add(dz, mu, alpha=beta / batch, out=dmu)
        torch.mul(dz, eps, out=dlogvar).mul_(std).add_(var, alpha=beta / batch).sub_(beta / batch).mul_(0.5)
        d_heads_w = weight_grad(dheads, h)  # (2D, H)
        grads[model.heads.mu.weight], grads[model.heads.logvar.weight] = d_heads_w[:latent], d_heads_w[latent:]
        grads[model.heads.mu.bias] = bias_grad(dmu, model.heads.mu.bias)
        grads[model.heads.logvar.bias] = bias_grad(dlogvar, model.heads.logvar.bias)
        if encoder:
            dy = matmul(dheads, heads_w.t())
        for i in reversed(range(len(encoder))):
            layer = encoder[i]
            dy = torch.ops.aten.threshold_backward(dy, enc_inputs[i + 1] if i + 1 < len(encoder) else h, 0)
            grads[layer.weight] = weight_grad(dy, enc_inputs[i])
            grads[layer.bias] = bias_grad(dy, layer.bias)
            if i > 0:
                dy = matmul(dy, layer.weight.t())

        optimizer.update([grads[p] for p in optimizer.params])
    return ModelOutput(loss=loss, terms={"recon": recon, "kl": kl})
