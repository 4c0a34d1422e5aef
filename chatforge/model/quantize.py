"""int8 quantisation for CPU decoding: ``chatforge serve --quantize int8`` and friends.

Decoding one token multiplies a handful of activation rows by every weight matrix of the
model once, so on a CPU it is bound by how fast the weights stream from memory, not by
arithmetic (``bench/generate.py`` prints that floor). Storing the matrices in int8 reads a
quarter of the bytes of fp32. This uses PyTorch's dynamic quantisation (fbgemm on x86,
qnnpack on ARM): each output channel of a weight gets its own scale, computed once here;
each activation row is quantised on the fly per call; products accumulate in int32 and
come back as fp32. What is quantised: every ``nn.Linear`` of the blocks (attention and
MLP) and the LM head (a quantised copy of the output matrix, also when it is tied to the
embedding). What is not: the embedding lookup, the norms and attention itself (fp32).

The quality cost is measured, not assumed: ``chatforge eval perplexity`` and ``chatforge
eval checks`` take ``--quantize int8`` too, so the same held-out data scores both.

A quantised model is for inference: it runs in fp32 around the int8 products (autocast
would hand bf16 activations to the int8 kernels), it has no gradients, and it is never
saved: the checkpoint stays the fp32 one, and quantising at load time takes well under a
second for the CPU presets.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

from chatforge.config import QUANTIZE_CHOICES
from chatforge.device import Precision, resolve_precision
from chatforge.errors import ChatforgeError


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` came out of ``quantize_model`` (its products run in int8)."""
    return getattr(model, "quantized", "none") != "none"


def _engine() -> str:
    engines = torch.backends.quantized.supported_engines
    for name in ("x86", "fbgemm", "qnnpack"):
        if name in engines:
            return name
    raise ChatforgeError(f"int8 quantisation needs PyTorch's fbgemm, x86 or qnnpack engine; this build has "
                         f"{', '.join(engines) or 'none'}")


def quantize_model(model: nn.Module, method: str = "int8") -> nn.Module:
    """A quantised copy of the GPT ``model`` (``method`` "none" returns ``model`` itself)."""
    if method == "none":
        return model
    if method not in QUANTIZE_CHOICES:
        raise ChatforgeError(f"quantize: {method!r} is not allowed; allowed: {', '.join(QUANTIZE_CHOICES)}")
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ChatforgeError(f"quantize int8 runs on the CPU only (its kernels are fbgemm/qnnpack); the model is "
                             f"on {device}: drop --quantize, or serve on --device cpu")
    if any(type(m).__name__.startswith("LoRA") for m in model.modules()):
        raise ChatforgeError("quantize int8: the model has unmerged LoRA adapters; merge them first "
                             "(the finetune stage's merged model)")
    torch.backends.quantized.engine = _engine()
    q = copy.deepcopy(model).eval()
    for p in q.parameters():
        p.requires_grad_(False)
    # The LM head as its own Linear, whether it is tied to the embedding or not, so that it is
    # quantised while the fp32 matrix stays where embedding lookups and ``output_weight`` need it.
    vocab, width = q.output_weight.shape
    head = nn.Linear(width, vocab, bias=False)
    head.weight = nn.Parameter(q.output_weight.detach().clone(), requires_grad=False)
    q.int8_head = head
    qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    with warnings.catch_warnings():  # the eager quantisation API warns that it will move to torchao
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(q, {"blocks": qconfig, "int8_head": qconfig}, dtype=torch.qint8)
    q.quantized = method
    return q


def model_precision(model: nn.Module, dtype: str, device: torch.device) -> Precision:
    """``resolve_precision`` for ``model``: a quantised model runs fp32 around its int8 products."""
    if not is_quantized(model):
        return resolve_precision(dtype, device)
    if dtype not in ("auto", "fp32"):
        raise ChatforgeError(f"dtype {dtype!r} with an int8-quantised model: its int8 products take fp32 "
                             f"activations; use --dtype fp32 (or auto)")
    return resolve_precision("fp32", device)
