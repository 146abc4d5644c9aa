"""Input gradients of stride-1 convolutions as forward convolutions (CPU).

An attack needs the gradient with respect to the input only. For a convolution with stride 1 that gradient is
itself a convolution: the output gradient convolved with the kernel flipped in space and with its input and
output channels swapped, padded by ``kernel - 1 - padding``. PyTorch's CPU backward computes it far slower than
a forward convolution of the same size (the demo UNet's last layer, 4 channels at 96^3: 115 ms against 36 ms),
so within :func:`input_gradient_convolutions` each such layer of the network passes its input gradient that way
and no gradient to its weights. The forward values are PyTorch's own (the same ``conv3d`` call); the input
gradient is the same sum in another order (float rounding).
"""
from contextlib import contextmanager

import torch
import torch.nn.functional as F

_CONVOLUTIONS = {torch.nn.Conv2d: F.conv2d, torch.nn.Conv3d: F.conv3d}


class _InputGradientConvolution(torch.autograd.Function):
    """A stride-1 convolution whose backward gives the input gradient only, by a forward convolution."""

    @staticmethod
    def forward(ctx, inputs, weight, bias, padding, convolve):
        ctx.save_for_backward(weight)
        ctx.padding, ctx.convolve = padding, convolve
        return convolve(inputs, weight, bias, 1, padding)

    @staticmethod
    def backward(ctx, output_gradient):
        weight, = ctx.saved_tensors
        spatial = tuple(range(2, weight.dim()))
        kernel = weight.flip(spatial).transpose(0, 1).to(output_gradient.dtype)
        padding = tuple(size - 1 - pad for size, pad in zip(weight.shape[2:], ctx.padding))
        return ctx.convolve(output_gradient, kernel, None, 1, padding), None, None, None, None


def swappable(module):
    """Whether ``module`` is a plain stride-1 convolution (no groups, dilation or non-zero padding mode)."""
    if type(module) not in _CONVOLUTIONS or "forward" in vars(module):
        return False
    return (module.groups == 1 and module.padding_mode == "zeros" and isinstance(module.padding, tuple)
            and all(step == 1 for step in module.stride) and all(rate == 1 for rate in module.dilation)
            and all(0 <= pad < size for pad, size in zip(module.padding, module.kernel_size)))


def _forward(module, inputs):
    if not inputs.requires_grad:
        return type(module).forward(module, inputs)
    bias = None if module.bias is None else module.bias.detach()
    return _InputGradientConvolution.apply(inputs, module.weight.detach(), bias, module.padding,
                                           _CONVOLUTIONS[type(module)])


@contextmanager
def input_gradient_convolutions(network, device, amp=False):
    """Within this block (on CPU, without autocast), the stride-1 convolutions of ``network`` pass input gradients
    only, each as a forward convolution; elsewhere (CUDA, whose backward is fast; autocast's dtypes) nothing
    changes."""
    swap = device.type == "cpu" and not amp
    layers = [module for module in network.modules() if swappable(module)] if swap else []
    for layer in layers:
        layer.forward = _forward.__get__(layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
