"""``codec.pth`` as upstream writes it: unwrapping, weight norm baked into plain weights (bit-exact),
and a strict check of every key and shape against a model."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

# -------------------------------------------------------------------------------------- checkpoint format

_WN_SUFFIXES = {  # weight-norm key suffix -> (role, partner suffix)
    "parametrizations.weight.original0": ("g", "parametrizations.weight.original1"),
    "parametrizations.weight.original1": ("v", "parametrizations.weight.original0"),
    "weight_g": ("g", "weight_v"),
    "weight_v": ("v", "weight_g"),
}


def unwrap_state_dict(sd: dict[str, Any]) -> dict[str, Tensor]:
    """Accept a {'state_dict': ...} wrapper and a GAN checkpoint's `generator.` prefix (as upstream does)."""
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if any(k.startswith("generator.") for k in sd):
        sd = {k[len("generator."):]: v for k, v in sd.items() if k.startswith("generator.")}
    return sd


def bake_weight_norm(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, list[str]], list[str]]:
    """Replace each g/v pair (either key style) by `weight` = g * v / ||v|| (norm over all dims but 0).

    Returns (baked state dict, baked key -> source keys, errors). torch._weight_norm is the very kernel that
    upstream's parametrization runs each forward, so baking is bit-exact.
    """
    out: dict[str, Tensor] = {}
    origin: dict[str, list[str]] = {}
    pairs: dict[str, dict[str, str]] = {}
    for k, t in sd.items():
        suffix = next((s for s in _WN_SUFFIXES if k.endswith("." + s)), None)
        if suffix is None:
            out[k], origin[k] = t, [k]
        else:
            pairs.setdefault(k[: -len(suffix)] + "weight", {})[_WN_SUFFIXES[suffix][0]] = k
    errors = []
    for base, p in pairs.items():
        origin[base] = sorted(p.values())  # also marks a broken pair as reported
        if len(p) != 2:
            (role, key), = p.items()
            suffix = next(s for s in _WN_SUFFIXES if key.endswith("." + s))
            errors.append(f"missing {key[: -len(suffix)] + _WN_SUFFIXES[suffix][1]} (weight-norm partner of {key})")
            continue
        g, v = sd[p["g"]], sd[p["v"]]
        if base in out:
            errors.append(f"both {base} and its weight-norm pair {p['g']}/{p['v']} are present")
        elif tuple(g.shape) != (v.shape[0],) + (1,) * (v.ndim - 1):
            errors.append(f"mis-shaped weight norm {p['g']} {tuple(g.shape)} for {p['v']} {tuple(v.shape)}")
        else:
            out[base] = torch._weight_norm(v.float(), g.float(), 0)
    return out, origin, errors


def check_state_dict(model: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strict coverage: raise ValueError naming every missing, unexpected or mis-shaped tensor."""
    sd, origin, errors = bake_weight_norm(unwrap_state_dict(state_dict))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for k in sorted(set(expected) - set(sd) - set(origin)):  # broken g/v pairs were reported by the baker
        wn = " (or its weight-norm g/v pair)" if weight_norm_style(k) else ""
        errors.append(f"missing {k} {expected[k]}{wn}")
    for k in sorted(set(sd) - set(expected)):
        errors.append(f"unexpected {'/'.join(origin[k])}")
    for k in sorted(set(sd) & set(expected)):
        if tuple(sd[k].shape) != expected[k]:
            errors.append(f"mis-shaped {'/'.join(origin[k])}: checkpoint {tuple(sd[k].shape)}, model {expected[k]}")
    if errors:
        more = [f"... and {len(errors) - 40} more"] if len(errors) > 40 else []
        raise ValueError(f"codec state dict does not match the config ({len(errors)} problems):\n  "
                         + "\n  ".join(errors[:40] + more))
    return sd


def weight_norm_style(key: str) -> str | None:
    """Upstream stores causal convs with parametrizations.weight_norm, dac's VQ projections with the legacy one."""
    if key.startswith(("encoder.", "decoder.")) and key.endswith(".conv.weight"):
        return "parametrizations"
    if key.startswith("quantizer.") and key.endswith(("in_proj.weight", "out_proj.weight")):
        return "legacy"
    return None
