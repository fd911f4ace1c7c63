"""Weights that let a picture through the real Stable Diffusion architectures.

Random weights make every synthetic image a near-constant smear that does not depend on its
input. These functions overwrite a few layers of a randomly initialised network so that a frame
survives the trip, while every layer keeps its shape and the rest keeps its random values (so
speed is unchanged). Nothing is trained: each weight below is written down.

The latent space. Both autoencoders map a pixel's colour ``r = rgb - 0.5`` (``rgb`` in [0, 1])
to four latent channels along the corners of a tetrahedron, ``latent = LATENT_GAIN * A @ r`` with
``A`` the rows ``(1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1)`` over sqrt(3), averaged over
8x8 pixels. ``A.T @ A = 4/3``, so ``r = 3 / (4 * LATENT_GAIN) * A.T @ latent`` decodes it, and
noise in the four channels is averaged down on the way back. These are the latents the pipeline
sees (after the VAE's ``scaling_factor``), the same for TAESD and the AutoencoderKL, as the real
TAESD shares the real VAE's latent space.

Three tricks carry a signal through layers that would otherwise destroy it:

* A residual block whose last convolution is zero is the identity (TAESD's blocks then apply a
  ReLU, so a signed value travels as the pair ``relu(x), relu(-x)``).
* A GroupNorm divides by the spread of its group. A group holding ``(x, -x, C, -C)`` has mean 0
  and a spread set by the constant ``C``, so it passes ``x`` with a fixed gain, its mean
  included; a group holding only ``x`` (and zeros) passes ``x`` divided by its own spread.
* SiLU is nearly the identity far from 0: ``silu(B + u) = B + u`` to 0.003 for ``B = 12``,
  ``|u| < 4``; the following convolution takes ``silu(B)`` back off.

The UNet predicts the noise a denoiser would: the fine detail of its input. Its ``conv_in`` takes
each latent channel's high-pass ``h = x - box3x3(x)``. The time embedding is fitted (a ridge
regression over the training timesteps, on its own random features) to report the noise level
``beta(t)``; the last resnet writes it beside the high-pass channels, where it dominates their
GroupNorm group's spread, so the final GroupNorm turns ``h`` into ``h / beta``. That noise
estimate leaves ``box3x3(x_t) / alpha`` as the x0 estimate: a third of the noise, and the picture
blurred by 3x3 latents. The prompt reaches the output through the first cross-attention: queries
from the (low-passed) picture, keys and values from the text encoder, so each prompt tints the
picture in its own content-dependent way. UNets without cross-attention at their first level
(SDXL's, SDXS's) pass the picture untinted. SDXL's added conditioning is kept out of the noise
level the time embedding reports. The deeper levels compute as before, but the last up block
takes only the first level's skip connection.
"""

from __future__ import annotations

import math

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
from torch import nn

LATENT_GAIN = 3.0
# Far enough from 0 that SiLU is the identity to within 0.003 over the signals used here.
SILU_OFFSET = 12.0
# Sets the spread of a (x, -x, C, -C) group; large against any signal here, small for float16.
GROUP_CONSTANT = 10.0
# The time embedding's first channel reports SILU_OFFSET + NOISE_LEVEL_GAIN * sqrt(1 - alpha_bar);
# the gain makes the noise level dominate the spread of its GroupNorm group.
NOISE_LEVEL_GAIN = 8.0
# Logit spread of the prompt's cross-attention: a few tokens win per pixel, which ones depends on
# the picture.
ATTENTION_LOGIT_STD = 3.0
# How strongly the prompt tints the x0 estimate, in latent units per unit of beta / alpha.
PROMPT_STRENGTH = 0.5

_TETRAHEDRON = torch.tensor(
    [[1.0, 1.0, 1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]]
) / math.sqrt(3.0)
_SMOOTH = torch.outer(torch.tensor([1.0, 2.0, 1.0]), torch.tensor([1.0, 2.0, 1.0])) / 16.0


def encode_matrix() -> torch.Tensor:
    """The (4, 3) map from a colour ``rgb - 0.5`` to its latent."""
    return LATENT_GAIN * _TETRAHEDRON


def decode_matrix() -> torch.Tensor:
    """The (3, 4) map from a latent back to ``rgb - 0.5``: the inverse of :func:`encode_matrix`."""
    return 0.75 / LATENT_GAIN * _TETRAHEDRON.T


def taesd_passthrough(vae: AutoencoderTiny) -> AutoencoderTiny:
    """Make a TAESD-shaped AutoencoderTiny encode and decode pictures approximately; returns it."""
    if vae.config.latent_channels != 4:
        raise ValueError(
            f"the see-through TAESD needs 4 latent channels; got {vae.config.latent_channels}."
        )
    with torch.no_grad():
        _taesd_encoder(vae.encoder.layers)
        _taesd_decoder(vae.decoder.layers)
    return vae


def kl_passthrough(vae: AutoencoderKL) -> AutoencoderKL:
    """Make an AutoencoderKL encode and decode pictures approximately; returns it.

    Needs four channels per GroupNorm group where the encoder and decoder end.
    """
    config = vae.config
    groups = config.norm_num_groups
    widths = config.block_out_channels
    if config.latent_channels != 4 or min(widths[0], widths[-1]) // groups < 4:
        raise ValueError(
            f"the see-through AutoencoderKL needs 4 latent channels and at least 4 channels per "
            f"group; got {config.latent_channels} latent channels, block_out_channels {widths} "
            f"and norm_num_groups {groups}."
        )
    with torch.no_grad():
        _kl_encoder(vae, groups)
        _kl_decoder(vae, groups)
    return vae


def unet_passthrough(
    unet: UNet2DConditionModel, seed: int, alphas_cumprod: torch.Tensor
) -> UNet2DConditionModel:
    """Make a UNet predict its input's fine detail as noise, tinted by the prompt; returns it.

    The weights are changed in place. ``seed`` draws the cross-attention projections that turn a
    prompt into a tint (when the first down block and the last up block have cross-attention);
    ``alphas_cumprod`` is the training schedule whose noise level the time embedding learns to
    report.
    """
    config = unet.config
    width = config.block_out_channels[0]
    group = width // config.norm_num_groups
    first, last = unet.down_blocks[0], unet.up_blocks[-1]
    attended = [getattr(block, "has_cross_attention", False) for block in (first, last)]
    if (
        config.in_channels != 4
        or config.out_channels != 4
        or group < 4
        or config.norm_num_groups < 7
        or attended[0] != attended[1]
    ):
        raise ValueError(
            "the see-through UNet needs 4 latent channels, at least 7 GroupNorm groups of at "
            "least 4 channels at its first level, and cross-attention in both or neither of its "
            f"first down block and last up block; got in/out channels {config.in_channels}/"
            f"{config.out_channels}, width {width}, norm_num_groups {config.norm_num_groups} "
            f"and cross-attention {attended}."
        )
    generator = torch.Generator().manual_seed(seed)
    # Channel layout at the first level, one job per GroupNorm group: two (h, h', s, -s) groups
    # with the high-pass h of two latent channels and the noise level s; the low-pass of the four
    # latent channels (the attention's queries); a (t, -t, C, -C) group per channel's prompt tint.
    high = [0, 1, group, group + 1]
    level = [2, group + 2]
    low = [2 * group + channel for channel in range(4)]
    tint = [(3 + channel) * group for channel in range(4)]
    with torch.no_grad():
        _unet_conv_in(unet.conv_in, high, low)
        for resnet in first.resnets:
            _zero_branch(resnet)
        if all(attended):
            _prompt_attention(first.attentions[0], low, tint, generator)
            for attention in [*first.attentions[1:], *last.attentions]:
                _zero(attention.proj_out)
        carried = high + low + [t + offset for t in tint for offset in (0, 1)]
        for index, resnet in enumerate(last.resnets):
            _zero_branch(resnet)
            shortcut = _matrix(resnet.conv_shortcut)
            shortcut.zero_()
            resnet.conv_shortcut.bias.zero_()
            # The first resnet keeps the skip connection (after the deeper levels' output), the
            # others keep what came before them.
            start = shortcut.shape[1] - width if index == 0 else 0
            for channel in carried:
                shortcut[channel, start + channel] = 1.0
        _fit_noise_level(unet.time_embedding, unet.time_proj, alphas_cumprod)
        if getattr(unet, "add_embedding", None) is not None:
            # SDXL adds its pooled text and size ids to the time embedding; keep them out of
            # the channel that reports the noise level.
            unet.add_embedding.linear_2.weight[0].zero_()
            unet.add_embedding.linear_2.bias[0].zero_()
        _noise_level_branch(last.resnets[-1], level, tint, group)
        _unet_output(unet, high, tint, group)
    return unet


# ------------------------------------------------------------------------ helpers


def _zero(layer: nn.Module) -> None:
    for parameter in layer.parameters():
        parameter.zero_()


def _zero_branch(resnet: nn.Module) -> None:
    """A ResnetBlock2D adds nothing to its input: its last convolution is zero."""
    _zero(resnet.conv2)


def _matrix(layer: nn.Module) -> torch.Tensor:
    """The weight of a Linear or 1x1 convolution as an (out, in) view."""
    return layer.weight.view(layer.weight.shape[0], layer.weight.shape[1])


def _centre(conv: nn.Conv2d, pairs: dict[tuple[int, int], float]) -> None:
    """A convolution that only mixes channels, at the centre tap: ``{(out, in): weight}``."""
    conv.weight.zero_()
    if conv.bias is not None:
        conv.bias.zero_()
    middle = conv.weight.shape[-1] // 2
    for (out, inp), value in pairs.items():
        conv.weight[out, inp, middle, middle] = value


def _per_channel(conv: nn.Conv2d, channels: list[int], kernel: torch.Tensor) -> None:
    """A convolution applying ``kernel`` to each of ``channels`` alone (zero elsewhere)."""
    conv.weight.zero_()
    if conv.bias is not None:
        conv.bias.zero_()
    size = kernel.shape[-1]
    for channel in channels:
        conv.weight[channel, channel, :size, :size] = kernel


def _average_2x2() -> torch.Tensor:
    """A 3x3 stride-2 kernel averaging the 2x2 pixels at offsets (0, 0)-(1, 1) from its corner."""
    return torch.full((2, 2), 0.25)


def _silu_norm(norm: nn.GroupNorm, gains: dict[int, float]) -> None:
    """A GroupNorm scaling the given channels by ``gains`` around SILU_OFFSET, zeroing the rest."""
    norm.weight.zero_()
    norm.bias.zero_()
    for channel, gain in gains.items():
        norm.weight[channel] = gain
        norm.bias[channel] = SILU_OFFSET


def _signed_group_gain(group: int, constant: float = GROUP_CONSTANT) -> float:
    """What a (x, -x, C, -C, 0...) group of ``group`` channels divides x by, for small x."""
    return math.sqrt(2.0 * constant**2 / group)


def _silu_floor() -> float:
    return float(torch.nn.functional.silu(torch.tensor(SILU_OFFSET, dtype=torch.float64)))


# ------------------------------------------------------------------------- TAESD


def _taesd_encoder(layers: nn.Sequential) -> None:
    convs = [layer for layer in layers if isinstance(layer, nn.Conv2d)]
    for layer in layers:
        if not isinstance(layer, nn.Conv2d):
            _zero(layer.conv[-1])
    # Pixels arrive in [0, 1] and stay non-negative until the last convolution, so the blocks'
    # ReLUs pass them.
    _centre(convs[0], {(c, c): 1.0 for c in range(3)})
    for conv in convs[1:-1]:
        conv.weight.zero_()
        for c in range(3):
            conv.weight[c, c, 1:, 1:] = _average_2x2()
    encode = encode_matrix()
    _centre(convs[-1], {(i, c): float(encode[i, c]) for i in range(4) for c in range(3)})
    convs[-1].bias.copy_(-0.5 * encode.sum(dim=1))


def _taesd_decoder(layers: nn.Sequential) -> None:
    convs = [layer for layer in layers if isinstance(layer, nn.Conv2d)]
    for layer in layers:
        if not isinstance(layer, (nn.Conv2d, nn.ReLU, nn.Upsample)):
            _zero(layer.conv[-1])
    # The colour travels as relu(r) in channels 0-2 and relu(-r) in 3-5, both through ReLUs.
    decode = decode_matrix()
    pairs = {(c, i): float(decode[c, i]) for c in range(3) for i in range(4)}
    pairs |= {(3 + c, i): -float(decode[c, i]) for c in range(3) for i in range(4)}
    _centre(convs[0], pairs)
    for conv in convs[1:-1]:
        _per_channel(conv, list(range(6)), _SMOOTH)
    _centre(convs[-1], {(c, c): 1.0 for c in range(3)} | {(c, 3 + c): -1.0 for c in range(3)})
    convs[-1].bias.fill_(0.5)


# ------------------------------------------------------------------ AutoencoderKL


def _slot(index: int, width: int, groups: int) -> int:
    """Channel of the signed pair member ``index`` (x of pair i is 2i, -x is 2i + 1): each pair
    opens a GroupNorm group, leaving room for (C, -C) behind it."""
    return (index // 2) * (width // groups) + index % 2


def _carry_resnets(resnets: nn.ModuleList, pairs: int, groups: int) -> None:
    for resnet in resnets:
        _zero_branch(resnet)
        if resnet.conv_shortcut is not None:
            inside, outside = (
                resnet.conv_shortcut.weight.shape[1],
                resnet.conv_shortcut.weight.shape[0],
            )
            _centre(
                resnet.conv_shortcut,
                {
                    (_slot(k, outside, groups), _slot(k, inside, groups)): 1.0
                    for k in range(2 * pairs)
                },
            )


def _carry_mid(mid: nn.Module, pairs: int, groups: int) -> None:
    _carry_resnets(mid.resnets, pairs, groups)
    for attention in mid.attentions:
        _zero(attention.to_out[0])


def _add_group_constants(resnet: nn.Module, pairs: int, groups: int) -> None:
    width = resnet.conv2.weight.shape[0]
    for pair in range(pairs):
        start = _slot(2 * pair, width, groups)
        resnet.conv2.bias[start + 2] = GROUP_CONSTANT
        resnet.conv2.bias[start + 3] = -GROUP_CONSTANT


def _read_signed_groups(norm: nn.GroupNorm, pairs: int, groups: int) -> None:
    """Set ``norm`` to pass each pair's x unscaled, around SILU_OFFSET."""
    width = norm.weight.shape[0]
    gain = _signed_group_gain(width // groups)
    _silu_norm(norm, {_slot(2 * pair, width, groups): gain for pair in range(pairs)})


def _kl_encoder(vae: AutoencoderKL, groups: int) -> None:
    encoder = vae.encoder
    width = encoder.conv_in.weight.shape[0]
    encode = encode_matrix()
    # Pixels arrive as 2r; each latent i leaves conv_in as the pair (latent_i, -latent_i), in
    # the pipeline's units: the scaling factor is divided out only by conv_out, so the signals
    # stay small against GROUP_CONSTANT and SILU_OFFSET.
    pairs = {}
    for i in range(4):
        for c in range(3):
            pairs[(_slot(2 * i, width, groups), c)] = float(encode[i, c]) / 2
            pairs[(_slot(2 * i + 1, width, groups), c)] = -float(encode[i, c]) / 2
    _centre(encoder.conv_in, pairs)
    for block in encoder.down_blocks:
        _carry_resnets(block.resnets, 4, groups)
        for down in block.downsamplers or []:
            inner = down.conv.weight.shape[0]
            channels = [_slot(k, inner, groups) for k in range(8)]
            _per_channel(down.conv, channels, _average_2x2())
    _carry_mid(encoder.mid_block, 4, groups)
    _add_group_constants(encoder.mid_block.resnets[-1], 4, groups)
    _read_signed_groups(encoder.conv_norm_out, 4, groups)
    last = encoder.conv_norm_out.weight.shape[0]
    unscale = 1.0 / vae.config.scaling_factor
    _centre(encoder.conv_out, {(i, _slot(2 * i, last, groups)): unscale for i in range(4)})
    # The mean takes silu's offset back off; the log-variance is small, as in a trained VAE.
    encoder.conv_out.bias[:4] = -unscale * _silu_floor()
    encoder.conv_out.bias[4:] = -10.0
    if vae.quant_conv is not None:
        _centre(vae.quant_conv, {(i, i): 1.0 for i in range(8)})
        vae.quant_conv.bias.zero_()


def _kl_decoder(vae: AutoencoderKL, groups: int) -> None:
    decoder = vae.decoder
    if vae.post_quant_conv is not None:
        _centre(vae.post_quant_conv, {(i, i): 1.0 for i in range(4)})
    width = decoder.conv_in.weight.shape[0]
    decode = decode_matrix() * vae.config.scaling_factor
    # Each colour r_c travels as the pair (r_c, -r_c), so GroupNorm at the end can pass it.
    pairs = {}
    for c in range(3):
        for i in range(4):
            pairs[(_slot(2 * c, width, groups), i)] = float(decode[c, i])
            pairs[(_slot(2 * c + 1, width, groups), i)] = -float(decode[c, i])
    _centre(decoder.conv_in, pairs)
    _carry_mid(decoder.mid_block, 3, groups)
    for block in decoder.up_blocks:
        _carry_resnets(block.resnets, 3, groups)
        for up in block.upsamplers or []:
            inner = up.conv.weight.shape[0]
            _per_channel(up.conv, [_slot(k, inner, groups) for k in range(6)], _SMOOTH)
    _add_group_constants(decoder.up_blocks[-1].resnets[-1], 3, groups)
    _read_signed_groups(decoder.conv_norm_out, 3, groups)
    last = decoder.conv_norm_out.weight.shape[0]
    # The decoder returns 2r in [-1, 1].
    _centre(decoder.conv_out, {(c, _slot(2 * c, last, groups)): 2.0 for c in range(3)})
    decoder.conv_out.bias.fill_(-2.0 * _silu_floor())


# ---------------------------------------------------------------------------- UNet


def _unet_conv_in(conv: nn.Conv2d, high: list[int], low: list[int]) -> None:
    conv.weight.zero_()
    conv.bias.zero_()
    for channel in range(4):
        conv.weight[low[channel], channel] = 1.0 / 9.0
        conv.weight[high[channel], channel] = -1.0 / 9.0
        conv.weight[high[channel], channel, 1, 1] = 8.0 / 9.0


def _prompt_attention(
    transformer: nn.Module, low: list[int], tint: list[int], generator: torch.Generator
) -> None:
    """Cross-attention from the low-passed picture to the prompt, written into the tint pairs."""
    block = transformer.transformer_blocks[0]
    inner = _matrix(transformer.proj_in).shape[0]
    text = block.attn2.to_k.weight.shape[1]
    # A large constant in one inner channel makes the LayerNorm before the attention a fixed
    # scale, so the queries follow the picture linearly.
    constant = 4.0 * math.sqrt(inner)
    proj_in = _matrix(transformer.proj_in)
    proj_in.zero_()
    transformer.proj_in.bias.zero_()
    for channel, source in enumerate(low):
        proj_in[channel, source] = constant / math.sqrt(inner)
    transformer.proj_in.bias[4] = constant
    _zero(block.attn1.to_out[0])
    _zero(block.ff.net[-1])

    def draw(rows: int, columns: int, std: float) -> torch.Tensor:
        return torch.randn((rows, columns), generator=generator) * std

    attention = block.attn2
    attention.to_q.weight.zero_()
    attention.to_q.weight[:, :4] = draw(inner, 4, ATTENTION_LOGIT_STD / 2.0)
    attention.to_k.weight.copy_(draw(inner, text, 1.0 / math.sqrt(text)))
    attention.to_v.weight.copy_(draw(inner, text, 1.0 / math.sqrt(text)))
    # The attention's output lands in inner channels 8-11, clear of the queries and the constant.
    to_out = attention.to_out[0]
    to_out.weight.zero_()
    to_out.bias.zero_()
    to_out.weight[8:12] = draw(4, inner, 1.0 / math.sqrt(inner))
    proj_out = _matrix(transformer.proj_out)
    proj_out.zero_()
    transformer.proj_out.bias.zero_()
    for channel, start in enumerate(tint):
        proj_out[start, 8 + channel] = 1.0
        proj_out[start + 1, 8 + channel] = -1.0


def _fit_noise_level(
    embedding: nn.Module, projection: nn.Module, alphas_cumprod: torch.Tensor
) -> None:
    """Fit the time embedding's first output to SILU_OFFSET + NOISE_LEVEL_GAIN * beta(t).

    The first layer keeps its random weights as features of the sinusoidal timestep; the first
    row of the second layer is their ridge-regression readout over every training timestep.
    """
    steps = torch.arange(len(alphas_cumprod))
    features = nn.functional.silu(embedding.linear_1(projection(steps).float())).double()
    design = torch.cat([features, torch.ones(len(steps), 1, dtype=torch.float64)], dim=1)
    beta = (1.0 - alphas_cumprod.double()).sqrt()
    target = SILU_OFFSET + NOISE_LEVEL_GAIN * beta
    ridge = 1e-3 * torch.eye(design.shape[1], dtype=torch.float64)
    readout = torch.linalg.solve(design.T @ design + ridge, design.T @ target)
    embedding.linear_2.weight[0] = readout[:-1].float()
    embedding.linear_2.bias[0] = float(readout[-1])


def _noise_level_branch(resnet: nn.Module, level: list[int], tint: list[int], group: int) -> None:
    """The last resnet's branch adds the noise level s, -s beside each high-pass pair and the
    constants of the tint groups; its input is ignored."""
    _zero(resnet.conv1)
    floor = _silu_floor()
    # Its own first GroupNorm group holds (s, -s, C, -C) from the time embedding alone.
    constant = 10.0 * NOISE_LEVEL_GAIN
    temb = resnet.time_emb_proj
    _zero(temb)
    temb.weight[0, 0], temb.bias[0] = 1.0, -floor
    temb.weight[1, 0], temb.bias[1] = -1.0, floor
    temb.bias[2], temb.bias[3] = constant, -constant
    _silu_norm(resnet.norm2, {0: _signed_group_gain(group, constant)})
    conv = resnet.conv2
    pairs = {(channel, 0): 1.0 for channel in level} | {(c + 1, 0): -1.0 for c in level}
    _centre(conv, pairs)
    for channel in level:
        conv.bias[channel], conv.bias[channel + 1] = -floor, floor
    for t in tint:
        conv.bias[t + 2], conv.bias[t + 3] = GROUP_CONSTANT, -GROUP_CONSTANT


def _unet_output(unet: UNet2DConditionModel, high: list[int], tint: list[int], group: int) -> None:
    # A high-pass group's spread is NOISE_LEVEL_GAIN * beta * sqrt(2 / group), so this gain
    # turns the high-pass h into h / beta: the noise estimate that leaves box3x3(x_t) / alpha.
    high_gain = NOISE_LEVEL_GAIN * math.sqrt(2.0 / group)
    tint_gain = _signed_group_gain(group)
    _silu_norm(unet.conv_norm_out, {c: high_gain for c in high} | {t: tint_gain for t in tint})
    _centre(
        unet.conv_out,
        {(c, high[c]): 1.0 for c in range(4)} | {(c, tint[c]): -PROMPT_STRENGTH for c in range(4)},
    )
    unet.conv_out.bias.fill_(-(1.0 - PROMPT_STRENGTH) * _silu_floor())
