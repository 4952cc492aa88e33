"""NumPy reference implementations of dlib's DNN layer semantics, for the port's tests.

Written from ../shared/docs/dlib-format.md §6–7 only — independently of ``dlibbridge.port.arch``
(no torch here) — in the spirit of ONNX's backend tests: each quirky op gets a plain,
loop-level-obvious implementation that the torch modules are checked against.  Arithmetic is
float64 unless a function reproduces one of dlib's float32 computations bit for bit (those
say so).

:func:`forward` runs a whole dlib face ResNet straight from its parsed record tree,
interpreting tag/skip/add_prev by the rule of §5 ("two consecutive tag-or-skip records are
(tag2, skip1) in forward order; a lone one is tag1"), so it shares no structure with the
torch port.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

# --------------------------------------------------------------------------------------
# Single ops


def normalize_input(chips: np.ndarray, mean) -> np.ndarray:
    """uint8 RGB chips (N,H,W,3) → (N,3,H,W): (pixel − float32 mean)/256 (§6.1)."""
    x = np.asarray(chips).astype(np.float32).transpose(0, 3, 1, 2)
    m = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    return ((x - m) / np.float32(256)).astype(np.float64)


def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: tuple[int, int],
           pad: tuple[int, int]) -> np.ndarray:
    """Cross-correlation with zero padding; out = 1 + (in + 2p − k)//s (§6.2)."""
    n, c, h, wd = x.shape
    f, c2, kh, kw = w.shape
    assert c == c2, (x.shape, w.shape)
    sy, sx = stride
    py, px = pad
    xp = np.zeros((n, c, h + 2 * py, wd + 2 * px), dtype=np.float64)
    xp[:, :, py:py + h, px:px + wd] = x
    win = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sy, ::sx]  # n c oh ow kh kw
    y = np.einsum("ncyxij,fcij->nfyx", win, w.astype(np.float64), optimize=True)
    if b is not None:
        y += np.asarray(b, dtype=np.float64).reshape(1, f, 1, 1)
    return y


def _pool(x: np.ndarray, k: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int], reduce) -> np.ndarray:
    """Windows at r·stride − pad … + k − 1, *clipped to the image* (§6.3); k = 0 is the
    whole input (avg_pool_everything)."""
    n, c, h, w = x.shape
    kh, kw = k
    if kh == 0:
        kh = h
    if kw == 0:
        kw = w
    sy, sx = stride
    py, px = pad
    oh = 1 + (h + 2 * py - kh) // sy
    ow = 1 + (w + 2 * px - kw) // sx
    y = np.empty((n, c, oh, ow), dtype=np.float64)
    for r in range(oh):
        r0, r1 = max(r * sy - py, 0), min(r * sy - py + kh, h)
        for col in range(ow):
            c0, c1 = max(col * sx - px, 0), min(col * sx - px + kw, w)
            y[:, :, r, col] = reduce(x[:, :, r0:r1, c0:c1], axis=(2, 3))
    return y


def max_pool(x, k, stride, pad):
    return _pool(x, k, stride, pad, np.max)


def avg_pool(x, k, stride, pad):
    """Mean over the clipped window only (count_include_pad=False)."""
    return _pool(x, k, stride, pad, np.mean)


def add_prev(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Shape = elementwise max; each operand sits at index 0 of every dimension and is
    zero everywhere beyond its own extent (§6.4)."""
    shape = tuple(max(p, q) for p, q in zip(a.shape, b.shape))
    y = np.zeros(shape, dtype=np.float64)
    y[tuple(slice(0, s) for s in a.shape)] += a
    y[tuple(slice(0, s) for s in b.shape)] += b
    return y


def affine(x: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    """CONV_MODE affine_: per-channel g·x + b (§6.7)."""
    c = x.shape[1]
    return x * np.asarray(g, np.float64).reshape(1, c, 1, 1) + np.asarray(b, np.float64).reshape(1, c, 1, 1)


def bn_inference(x, gamma, beta, running_mean, running_var, eps):
    """bn_con with one sample: gamma·(x − μ)/sqrt(σ² + eps) + beta with running stats."""
    c = x.shape[1]
    r = lambda v: np.asarray(v, np.float64).reshape(1, c, 1, 1)  # noqa: E731
    return r(gamma) * (x - r(running_mean)) / np.sqrt(r(running_var) + eps) + r(beta)


def bn_train(x, gamma, beta, running_mean, running_var, eps, num_updates, window):
    """bn_con on a batch of more than one sample (§6.7): batch statistics (biased variance)
    normalise; running stats move by decay = 1/(num_updates + 1) towards μ_B and the
    *unbiased* σ²_B; then num_updates = min(num_updates + 1, window).
    Returns (y, new_running_mean, new_running_var, new_num_updates)."""
    n, c, h, w = x.shape
    m = n * h * w
    mu = x.mean(axis=(0, 2, 3))
    var = x.var(axis=(0, 2, 3))  # biased
    decay = 1.0 / (num_updates + 1.0)
    new_mean = (1 - decay) * np.asarray(running_mean, np.float64) + decay * mu
    new_var = (1 - decay) * np.asarray(running_var, np.float64) + decay * var * m / (m - 1)
    y = bn_inference(x, gamma, beta, mu, var, eps)
    return y, new_mean, new_var, min(num_updates + 1, window)


def affine_from_bn(gamma, beta, running_mean, running_var, eps):
    """dlib's bn_ → affine_ conversion, ``affine_(const bn_&)`` in dlib/dnn/layers.h:
    g = gamma / sqrt(running_var + float(eps)), b = beta − g·running_mean, in float32.
    (dlib-format.md §6.7 says the sum is taken in double: that is dlib's bn inference kernel,
    not this conversion; tests/test_codec_rewrite.py shows the float sum is what dlib loads.)"""
    f32 = np.float32
    gamma, beta = np.asarray(gamma, f32), np.asarray(beta, f32)
    rm, rv = np.asarray(running_mean, f32), np.asarray(running_var, f32)
    s = (rv + f32(eps)).astype(f32)
    g = (gamma / np.sqrt(s)).astype(f32)
    b = (beta - (g * rm).astype(f32)).astype(f32)
    return g, b


def fc(x: np.ndarray, params: np.ndarray, num_inputs: int, num_outputs: int, has_bias: bool) -> np.ndarray:
    """y = flatten(x) · W with W = params rows [0, num_inputs) viewed (in, out); bias = the
    next row (§6.5)."""
    p = np.asarray(params, np.float64).reshape(-1)
    wmat = p[:num_inputs * num_outputs].reshape(num_inputs, num_outputs)
    y = x.reshape(x.shape[0], -1) @ wmat
    if has_bias:
        y += p[num_inputs * num_outputs:(num_inputs + 1) * num_outputs]
    return y


# --------------------------------------------------------------------------------------
# A whole network from its dlib record tree


def _details_forward(d, x):
    """Apply one layer details record (inference semantics) to x."""
    t = d.layer_type
    if t == "con":
        f = d["num_filters"]
        fs = d["filters"]
        w = d["params"].reshape(-1)[:int(np.prod(fs))].reshape(fs)
        bias = None
        if d.get("use_bias", True) and d["biases"][1] > 0:
            bias = d["params"].reshape(-1)[w.size:w.size + f]
        assert not d.get("use_relu", False)
        return conv2d(x, w, bias, (d["stride_y"], d["stride_x"]), (d["padding_y"], d["padding_x"]))
    if t == "affine":
        assert d["mode"] == 0 and not d.get("disabled", False)
        p = d["params"].reshape(-1)
        return affine(x, p[:p.size // 2], p[p.size // 2:])
    if t == "bn_con":
        p = d["params"].reshape(-1)
        return bn_inference(x, p[:p.size // 2], p[p.size // 2:], d["running_means"].reshape(-1),
                            d["running_variances"].reshape(-1), d["eps"])
    if t == "relu":
        return np.maximum(x, 0)
    if t in ("max_pool", "avg_pool"):
        op = max_pool if t == "max_pool" else avg_pool
        return op(x, (d["nr"], d["nc"]), (d["stride_y"], d["stride_x"]), (d["padding_y"], d["padding_x"]))
    if t == "fc":
        has_bias = d["bias_mode"] == 0 and d.get("use_bias", True)
        return fc(x, d["params"], d["num_inputs"], d["num_outputs"], has_bias)
    raise NotImplementedError(f"reference forward: no semantics for {d.version}")


def forward(model, chips: np.ndarray):
    """Descriptors of uint8 RGB chips (N,H,W,3) through a parsed face-ResNet tree
    (``dlibbridge.load``), plus ``[(name, dlib_path, array)]`` intermediates: ``stem`` (after
    the max pool) and ``block<i>`` (after each residual block's final relu)."""
    entries = model.layers()
    kinds = [type(e.node).__name__ for e in entries]
    x = None
    tags: dict[str, np.ndarray] = {}
    add_from = "1"
    inter = []
    nblock = 0
    i = 0
    while i < len(entries):
        e = entries[i]
        kind = kinds[i]
        if kind == "InputLayer":
            inp = e.node.input
            x = normalize_input(chips, (inp["avg_red"], inp["avg_green"], inp["avg_blue"]))
            x = _details_forward(e.node.details, x)
        elif kind == "TagOrSkip":
            if i + 1 < len(entries) and kinds[i + 1] == "TagOrSkip":
                tags["2"] = x            # tag2 (main path) …
                x = tags["1"]            # … then skip1 back to the block input
                add_from = "2"
                i += 1
            else:
                tags["1"] = x
        elif kind == "Loss":
            pass
        else:
            d = e.details
            if d.layer_type == "add_prev":
                x = add_prev(x, tags[add_from])
                add_from = "1"
                if kinds[i + 1] == "AddLayer" and entries[i + 1].details.layer_type == "relu":
                    x = np.maximum(x, 0)
                    i += 1
                    inter.append((f"block{nblock}", entries[i].path, x))
                    nblock += 1
            else:
                x = _details_forward(d, x)
                if d.layer_type == "max_pool":
                    inter.append(("stem", e.path, x))
                elif d.layer_type == "avg_pool" and d["nr"] == 0:
                    inter.append(("pool", e.path, x.reshape(x.shape[0], -1)))
        i += 1
    return x, inter
