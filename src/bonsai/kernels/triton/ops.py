"""Launchers for the Triton bitmatmul kernels: w1a16(x, weight) and w1a8(x, weight).

Both take row operations of bonsai.kernels.fusion (W1A16_FUSES, W1A8_FUSES): GELU, the q / k head
norms and the gated residual in the GEMM epilogue (head norms for heads of a power-of-two size up to
MAX_HEAD_DIM; others are finished in torch by the launcher); W1A8 also the prologue, in the kernel
that quantizes x anyway. W1A16 reads x straight into the GEMM's tiles, so a prologue there would need
a pass of its own (row statistics) and would redo the normalization in every column block: it is left
to the dispatcher.

On CUDA the tile shape is autotuned per (M bucket, N, K) from the config lists below: one list
for M <= 16 (memory-bound: few rows, narrow N tiles so that every SM streams weights), one for
mid M and one for large M (compute-bound: big tiles). Passing `config` runs one fixed tile
shape instead, which is how the tests run the kernels under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from functools import cache

import torch
import triton
import triton.testing

from ..fusion import PROLOGUE, Epilogue, Prologue, apply_epilogue, epilogue_parts, rows_per_sample, split
from ..packed import PackedWeight
from . import fragment_kernels, kernels, ws
from .fragments import BF16_CHUNK, INT8_CHUNK, bf16_words, int8_words
from .layout import kmajor_signs, layout_of

SMALL_M = 16
MID_M = 256
# "k-major": kernels.py (weight expanded into shared memory, the B operand). "fragment":
# fragment_kernels.py (weight expanded into the A-operand registers; see benchmarks/triton_sass.py).
# "fragment": 1.3-1.6x faster than "k-major" on bonsai-4b's GEMMs. "ws": the warp-specialized Gluon kernels
# (ws.py, gluon_ws.py) where they apply (Hopper; see ws.supports), else "fragment"; on an H100, on bonsai-4b's
# GEMMs at 1024-4096 rows, 1.12-1.27x (W1A16) and 1.01-1.19x (W1A8) faster than "fragment"
# (benchmarks/RESULTS.md). "auto", the default: "ws" from WS_MIN_ROWS rows on, where it was timed, else "fragment".
VARIANTS = ("k-major", "fragment", "ws", "auto")
DEFAULT_VARIANT = os.environ.get("BONSAI_TRITON_VARIANT", "auto")
WS_MIN_ROWS = 1024
# Why the "ws" kernels did not build here, once they did not: "auto" then keeps to "fragment".
_ws_failure: list[str] = []
# Row operations each kernel fuses (fusion.PARTS).
W1A16_FUSES = frozenset({"gelu", "head_norm", "residual"})
W1A8_FUSES = frozenset({PROLOGUE, "gelu", "head_norm", "residual"})
MAX_HEAD_DIM = 256  # the widest tile: a head must fit in one tile's columns
# W1A8's activation formats: int8 (int32 accumulation) or float8 e4m3 (float32 accumulation, which Triton
# keeps asynchronous on Hopper). fp8 runs on the fragment kernel only, and only under Triton's interpreter:
# on an H200, Triton 3.6 compiled it wrong for 4 of its 6 tiles (NaN or off by 4e-2 .. 10; benchmarks/RESULTS.md).
ACTIVATIONS = ("int8", "fp8")
FP8_CAPABILITY = (8, 9)
# +1.0 as a bit pattern, per activation dtype (W1A16 flips bit 15 for -1).
_ONE_BITS = {torch.bfloat16: 0x3F80, torch.float16: 0x3C00}


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    split_k: int = 1  # W1A16 fragment kernel only: K shares, summed by the last program of each tile
    stream_k: bool = False  # "ws" kernels only: one program per SM over all the tiles' K steps (schedule.py)


def _configs(shapes: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per M range.
_W1A16_TILES = {
    "small": [(16, 32, 256, 4, 4), (16, 64, 128, 4, 4), (16, 64, 256, 4, 3), (16, 128, 128, 4, 4)],
    "mid": [(64, 128, 64, 4, 4), (64, 256, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 64, 8, 3)],
    "large": [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3), (128, 256, 64, 8, 4),
              (128, 128, 128, 8, 3), (256, 256, 64, 16, 3)],
}
_W1A8_TILES = {
    "small": [(16, 32, 256, 4, 4), (16, 64, 128, 4, 4), (16, 64, 256, 4, 3), (16, 128, 128, 4, 4)],
    "mid": [(64, 128, 128, 4, 4), (64, 256, 128, 8, 3), (128, 128, 128, 4, 4), (128, 128, 128, 8, 3)],
    "large": [(128, 256, 128, 8, 3), (128, 128, 128, 8, 4), (256, 128, 128, 8, 3), (128, 256, 64, 8, 4),
              (128, 128, 256, 8, 3), (256, 128, 64, 8, 4), (256, 256, 128, 16, 3)],
}


# Fragment kernels: BLOCK_M counts tokens (the wgmma N side), BLOCK_N weight rows (16 per warp).
_W1A16_FRAG_TILES = {
    "small": [(16, 64, 256, 4, 4), (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (16, 128, 256, 4, 3)],
    "mid": [(64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 128, 64, 4, 4), (128, 128, 64, 8, 3)],
    "large": [(256, 128, 64, 8, 3), (256, 128, 64, 8, 4), (128, 256, 64, 8, 3), (256, 128, 128, 8, 3),
              (256, 64, 64, 4, 4), (128, 128, 64, 4, 4)],
}
_W1A8_FRAG_TILES = {
    "small": [(16, 64, 256, 4, 4), (16, 64, 128, 4, 4), (16, 128, 128, 4, 4)],
    "mid": [(64, 128, 128, 4, 4), (128, 64, 128, 4, 4), (128, 128, 128, 4, 3), (128, 128, 128, 8, 3)],
    # 4-warp tiles leave room for two programs per SM: one unpacks while the other's (synchronous) int8 wgmma runs
    "large": [(256, 128, 128, 8, 3), (128, 256, 128, 8, 3), (256, 64, 128, 4, 3), (128, 128, 128, 4, 4),
              (256, 128, 256, 8, 2)],
}


def _m_range(m_bucket: int) -> str:
    return "small" if m_bucket <= SMALL_M else "mid" if m_bucket <= MID_M else "large"


def m_bucket(m: int) -> int:
    """The autotuner's M key: M rounded up to a power of two (<= 16 all share one bucket)."""
    return SMALL_M if m <= SMALL_M else min(triton.next_power_of_2(m), 8192)


def _fit_group(block_k: int, group: int) -> int:
    """Largest BLOCK_K <= block_k that divides the group size (W1A8 applies group scales per group)."""
    if group:
        while group % block_k:
            block_k //= 2
    return block_k


def _prune(tiles: dict[str, list], per_group: bool, configs: list[triton.Config], named_args: dict,
           **kwargs) -> list[triton.Config]:
    """Keep the tiles of this M range (with head norms, those holding whole heads); shrink BLOCK_K to divide
    the group size where the kernel needs it."""
    args = {**named_args, **kwargs}
    wanted = {tuple(t) for t in tiles[_m_range(args["M_BUCKET"])]}
    group = args["GROUP"] if per_group else 0
    head_dim = args["HEAD_DIM"]
    kept = []
    for c in configs:
        kw = c.kwargs
        whole_heads = not head_dim or kw["BLOCK_N"] % head_dim == 0
        if (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], c.num_warps, c.num_stages) in wanted and whole_heads:
            kw = {**kw, "BLOCK_K": _fit_group(kw["BLOCK_K"], group)}
            kept.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    return kept


def _bench(fn, quantiles):
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


# Few rows (M <= SMALL_M) leave most SMs idle: a 3072-wide output is 48 tiles of 64 rows for 132 SMs, and
# streaming the weights needs several programs per SM. The W1A16 fragment kernel then splits K.
MAX_SPLIT_K = 8
PROGRAMS_PER_SM = 4


@cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_k(m: int, n: int, k: int, block_n: int, block_k: int, sms: int) -> int:
    """K shares for an [m, k] x [k, n] product: 1 above SMALL_M rows; else about PROGRAMS_PER_SM programs per
    SM, at most MAX_SPLIT_K shares of at least two K blocks each, and none of them empty."""
    blocks = triton.cdiv(k, block_k)
    if m > SMALL_M or blocks < 4:
        return 1
    shares = min(MAX_SPLIT_K, max(1, PROGRAMS_PER_SM * sms // triton.cdiv(n, block_n)), blocks // 2)
    return filled_shares(blocks, shares)


def filled_shares(blocks: int, shares: int) -> int:
    """How many of `shares` K shares hold work when each takes ceil(blocks / shares) of the K blocks (as the
    kernel splits them): 6 blocks in 4 shares are 3 shares of 2."""
    return triton.cdiv(blocks, triton.cdiv(blocks, shares))


def _split_heuristic(a: dict) -> int:
    return split_k(a["M"], a["N"], a["K"], a["BLOCK_N"], a["BLOCK_K"], _sm_count(a["x_ptr"].device))


def _autotuned(kernel, tiles: dict[str, list], per_group: bool, splits_k: bool = False):
    all_tiles = sorted({t for ts in tiles.values() for t in ts})
    heuristics = {"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0}
    if splits_k:
        heuristics["SPLIT_K"] = _split_heuristic
    even_k = triton.heuristics(heuristics)(kernel)
    prune = lambda c, n, **kw: _prune(tiles, per_group, c, n, **kw)  # noqa: E731
    return triton.autotune(configs=_configs(all_tiles), key=["M_BUCKET", "N", "K", "GROUP", "HEAD_DIM"],
                           prune_configs_by={"early_config_prune": prune}, do_bench=_bench,
                           cache_results=True)(even_k)  # kept for later processes (per GPU architecture)


_w1a16_tuned = _autotuned(kernels.w1a16_kernel, _W1A16_TILES, per_group=False)
_w1a8_tuned = _autotuned(kernels.w1a8_kernel, _W1A8_TILES, per_group=True)
_w1a16_frag_tuned = _autotuned(fragment_kernels.w1a16_frag_kernel, _W1A16_FRAG_TILES, per_group=True, splits_k=True)
_w1a8_frag_tuned = _autotuned(fragment_kernels.w1a8_frag_kernel, _W1A8_FRAG_TILES, per_group=True)
# Kernels whose BLOCK_K must divide the group size (they apply group scales per K step or per group).
_PER_GROUP = (kernels.w1a8_kernel, fragment_kernels.w1a16_frag_kernel, fragment_kernels.w1a8_frag_kernel)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# (kernel name, M bucket, N, K, group size, activation dtype) -> the config the autotuner chose. Later calls
# launch the kernel with it directly: the autotuner's per-call bookkeeping costs more than a small GEMM.
_chosen: dict[tuple, triton.Config] = {}


def _launch(tuned, kernel, args: tuple, consts: dict, m: int, n: int, k: int, config: TileConfig | None,
            splits_k: bool = False) -> None:
    """Run the kernel (autotuned, or with `config`). splits_k: the kernel has SPLIT_K, which the launches
    after tuning compute as the autotuner's heuristic does (split_k)."""
    if config is None and not _interpreting():
        key = (kernel.__name__, m_bucket(m), n, k, consts["GROUP"], consts["HEAD_DIM"], args[0].dtype)
        chosen = _chosen.get(key)
        if chosen is None:
            grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),  # noqa: E731
                                 meta.get("SPLIT_K", 1))
            tuned[grid](*args, **consts)
            if getattr(tuned, "best_config", None) is not None:
                _chosen[key] = tuned.best_config
            return
        kw = dict(chosen.kwargs)
        split = split_k(m, n, k, kw["BLOCK_N"], kw["BLOCK_K"], _sm_count(args[0].device)) if splits_k else 1
        if splits_k:
            kw["SPLIT_K"] = split
        grid = (triton.cdiv(m, kw["BLOCK_M"]) * triton.cdiv(n, kw["BLOCK_N"]), split)
        kernel[grid](*args, **consts, **kw, EVEN_K=k % kw["BLOCK_K"] == 0, num_warps=chosen.num_warps,
                     num_stages=chosen.num_stages)
        return
    config = config or TileConfig(SMALL_M, 32, 64)
    block_k = _fit_group(config.block_k, consts.get("GROUP", 0) if kernel in _PER_GROUP else 0)
    head_dim = consts["HEAD_DIM"]
    block_n = config.block_n if not head_dim else triton.cdiv(config.block_n, head_dim) * head_dim  # whole heads
    split = config.split_k if splits_k else 1
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, block_n), split)
    extra = {"SPLIT_K": split} if splits_k else {}
    kernel[grid](*args, **consts, **extra, EVEN_K=k % block_k == 0, BLOCK_M=config.block_m, BLOCK_N=block_n,
                 BLOCK_K=block_k, GROUP_M=config.group_m, num_warps=config.num_warps, num_stages=config.num_stages)


@dataclass(frozen=True)
class _Operands:
    """x flattened to [M, K] (contiguous, its own dtype), plus the epilogue inputs shared by both kernels."""

    x2: torch.Tensor
    out: torch.Tensor
    xsum: torch.Tensor | None  # float32 [M]: sum_k x[m, k], for the row offset
    xv: torch.Tensor | None  # bfloat16 [M, R]: x @ lowrank_v.T
    bias: torch.Tensor | None
    gelu: bool = False
    residual: torch.Tensor | None = None  # [M, N] contiguous
    gate: torch.Tensor | None = None  # [B, N] contiguous
    rows_per_sample: int = 1
    norm_weight: torch.Tensor | None = None  # [parts, head_dim] contiguous: head norms of the first norm_cols columns
    norm_cols: int = 0
    norm_eps: float = 0.0

    @property
    def head_dim(self) -> int:
        return 0 if self.norm_weight is None else self.norm_weight.shape[1]

    @property
    def norm_part(self) -> int:
        """Columns per part (q, k) of the normalized columns."""
        return 1 if self.norm_weight is None else self.norm_cols // self.norm_weight.shape[0]


def _check_share(name: str, fuses: frozenset[str], prologue: Prologue | None, epilogue: Epilogue | None) -> None:
    if prologue is not None and PROLOGUE not in fuses:
        raise ValueError(f"{name} does not fuse a prologue (bitmatmul applies it before the kernel)")
    extra = set(epilogue_parts(epilogue)) - fuses if epilogue is not None else set()
    if extra:
        raise ValueError(f"{name} does not fuse {sorted(extra)} (bitmatmul applies them after the kernel)")


def _kernel_share(epilogue: Epilogue | None, fuses: frozenset[str]) -> tuple[Epilogue | None, Epilogue | None]:
    """(the kernel's part of the epilogue, the rest for torch): all of it, unless its heads are not a
    power of two <= MAX_HEAD_DIM (no tile holds whole heads then): from the head norms on, torch."""
    if epilogue is None or epilogue.norm_weight is None:
        return epilogue, None
    d = epilogue.norm_weight.shape[1]
    if d <= MAX_HEAD_DIM and d & (d - 1) == 0:
        return epilogue, None
    share = split(None, epilogue, fuses - {"head_norm"})
    return share.epilogue, share.after


def _with_epilogue(ops: _Operands, x: torch.Tensor, n: int, prologue: Prologue | None,
                   epilogue: Epilogue | None) -> _Operands:
    """ops with the fused epilogue's operands, checked against x [..., K] -> [..., N]."""
    rps = rows_per_sample(x, prologue, epilogue)
    if epilogue is None:
        return replace(ops, rows_per_sample=rps)
    residual = gate = None
    if epilogue.residual is not None:
        if tuple(epilogue.residual.shape) != (*x.shape[:-1], n):
            raise ValueError(f"residual: expected shape {(*x.shape[:-1], n)}, got {tuple(epilogue.residual.shape)}")
        residual = epilogue.residual.reshape(-1, n).contiguous()
    if epilogue.gate is not None:
        if tuple(epilogue.gate.shape) != (x.shape[0], n):
            raise ValueError(f"gate: expected shape {(x.shape[0], n)}, got {tuple(epilogue.gate.shape)}")
        gate = epilogue.gate.contiguous()
    norm = {}
    if epilogue.norm_weight is not None:
        norm = dict(norm_weight=epilogue.norm_weight.contiguous(), norm_cols=epilogue.norm_cols, norm_eps=epilogue.norm_eps)
        if epilogue.norm_cols > n:
            raise ValueError(f"head norms of {epilogue.norm_cols} columns, but the output has {n}")
    return replace(ops, gelu=epilogue.gelu, residual=residual, gate=gate, rows_per_sample=rps, **norm)


def _operands(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None, row_sums: bool = True,
              lowrank: bool = True) -> _Operands:
    """row_sums=False: leave them to the caller (W1A8's quantization kernel writes them into ops.xsum);
    lowrank=False: leave x @ V.T to the caller (W1A8 with a prologue: it multiplies the prologue's output)."""
    if x.shape[-1] != weight.in_features:
        raise ValueError(f"x has K={x.shape[-1]}, weight expects K={weight.in_features}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"Triton bitmatmul takes bf16/fp16/fp32 activations, got {x.dtype}")
    if bias is not None and bias.shape != (weight.out_features,):
        raise ValueError(f"bias: expected shape ({weight.out_features},), got {tuple(bias.shape)}")
    x2 = x.reshape(-1, weight.in_features).contiguous()
    out = torch.empty(x2.shape[0], weight.out_features, dtype=x.dtype, device=x.device)
    xsum = None
    if weight.row_offset is not None:  # one reduction, accumulated in float32 without a float32 copy of x
        xsum = x2.sum(-1, dtype=torch.float32) if row_sums else torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    layout = layout_of(weight)
    xv = x2.to(torch.bfloat16) @ layout.lowrank_v.t() if layout.lowrank_v is not None and lowrank else None
    return _Operands(x2, out, xsum, xv, None if bias is None else bias.contiguous())


def _epilogue_args(weight: PackedWeight, ops: _Operands) -> tuple:
    """The pointers of _epilogue: row scale, offset, x row sums, x V^T, U^T, bias, residual, gate, head-norm weights."""
    layout = layout_of(weight)
    dummy = weight.row_scale  # any tensor: pointers of absent terms are never read
    return (weight.row_scale, _or(weight.row_offset, dummy), _or(ops.xsum, dummy), _or(ops.xv, dummy),
            _or(layout.lowrank_u_t, dummy), _or(ops.bias, dummy), _or(ops.residual, dummy), _or(ops.gate, dummy),
            _or(ops.norm_weight, dummy))


def _epilogue_scalars(ops: _Operands) -> tuple:
    """The epilogue's numbers after the shapes: rows per sample, normalized columns, columns per part, eps."""
    return ops.rows_per_sample, ops.norm_cols, ops.norm_part, ops.norm_eps


def _epilogue_consts(weight: PackedWeight, ops: _Operands) -> dict:
    return {"HAS_OFFSET": weight.row_offset is not None, "RANK": 0 if ops.xv is None else ops.xv.shape[1],
            "HAS_BIAS": ops.bias is not None, "GELU": ops.gelu, "HEAD_DIM": ops.head_dim,
            "HAS_RESIDUAL": ops.residual is not None, "HAS_GATE": ops.gate is not None}


def _or(t: torch.Tensor | None, default: torch.Tensor) -> torch.Tensor:
    return default if t is None else t


def _finish(x: torch.Tensor, out: torch.Tensor, n: int, after: Epilogue | None = None) -> torch.Tensor:
    y = out.reshape(*x.shape[:-1], n)
    return y if after is None else apply_epilogue(y, after, inplace=True)


def fragment_supports_group(group_size: int, chunk: int) -> bool:
    """The fragment kernels take group scales per K step, so a step (a multiple of the chunk) must fit in a group."""
    return group_size == 0 or group_size % chunk == 0


def _variant(variant: str | None, m: int) -> str:
    """The variant asked for (else DEFAULT_VARIANT) for m rows, "auto" resolved."""
    variant = variant or DEFAULT_VARIANT
    if variant not in VARIANTS:
        raise ValueError(f"unknown Triton kernel variant {variant!r}; choose from {VARIANTS}")
    if variant == "auto":
        return "ws" if m >= WS_MIN_ROWS and not _ws_failure else "fragment"
    return variant


def _ws_ran(launch, auto: bool) -> bool:
    """launch() of a "ws" kernel: True. Under "auto", kernels that do not build with this Triton are reported
    once and the fragment kernels take over: False (a variant asked for by name raises)."""
    try:
        launch()
    except ws.BUILD_ERRORS as err:
        if not auto:
            raise
        _ws_failure.append(f"{type(err).__name__}: {err}")
        warnings.warn(f"the warp-specialized Triton kernels do not build with Triton {triton.__version__}; the "
                      f"fragment kernels run instead ({_ws_failure[0][:300]})", RuntimeWarning, stacklevel=3)
        return False
    return True


def _ws_tile(config: TileConfig | None, chunk: int) -> ws.Tile | None:
    """A fixed tile for the "ws" kernels: BLOCK_K one chunk (their K step)."""
    if config is None:
        return None
    return ws.Tile(config.block_m, config.block_n, chunk, config.num_warps, config.num_stages, config.stream_k)


def _fragment_config(config: TileConfig | None, chunk: int) -> TileConfig | None:
    """A fixed tile for the fragment kernels: BLOCK_K at least one chunk, BLOCK_N a multiple of 16."""
    if config is None:
        return None
    return replace(config, block_n=max(16, config.block_n), block_k=max(chunk, config.block_k))


def w1a16(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None,
          prologue: None = None, epilogue: Epilogue | None = None,
          config: TileConfig | None = None, variant: str | None = None) -> torch.Tensor:
    """y = epilogue(x @ W.T (+ bias)) for x [..., K] bf16/fp16/fp32 (fp32 is computed in bf16); returns
    x.dtype. The epilogue may have the parts of W1A16_FUSES (GELU, head norms, residual + gate); no prologue.

    variant: one of VARIANTS (default DEFAULT_VARIANT); "ws" falls back to "fragment" where it does not
    apply (ws.supports; and at M <= SMALL_M), "fragment" to "k-major" for group sizes that are not a
    multiple of 64."""
    _check_share("triton-w1a16", W1A16_FUSES, prologue, epilogue)
    epilogue, after = _kernel_share(epilogue, W1A16_FUSES)
    ops = _with_epilogue(_operands(x, weight, bias), x, weight.out_features, prologue, epilogue)
    layout = layout_of(weight)
    xc = ops.x2.to(torch.bfloat16) if ops.x2.dtype == torch.float32 else ops.x2
    m, k = xc.shape
    n = weight.out_features
    if layout.group_bits_bf16 is None:
        gsb = weight.signs
    else:
        gsb = layout.group_bits_bf16 if xc.dtype == torch.bfloat16 else layout.group_bits_f16
    epi_args = _epilogue_args(weight, ops)
    consts = {"ONE_BITS": _ONE_BITS[xc.dtype], "GROUP": weight.group_size, **_epilogue_consts(weight, ops)}
    auto, variant = (variant or DEFAULT_VARIANT) == "auto", _variant(variant, m)
    if variant in ("fragment", "ws") and fragment_supports_group(weight.group_size, BF16_CHUNK):
        if weight.col_scale is not None:  # x^T goes to shared memory as loaded: scale x first (as k-major does, in fp32)
            xc = (xc.float() * weight.col_scale).to(xc.dtype)
        words = weight.prepared("triton-fragment-bf16", bf16_words)
        if (variant == "ws" and m > SMALL_M and ws.supports(xc, weight, ops.head_dim, consts["RANK"])
                and _ws_ran(lambda: ws.w1a16(xc, words, ops.out, epi_args, _epilogue_scalars(ops), consts,
                                             _ws_tile(config, BF16_CHUNK)), auto)):
            return _finish(x, ops.out, n, after)
        config = _fragment_config(config, BF16_CHUNK)
        most = config.split_k if config else MAX_SPLIT_K if m <= SMALL_M and xc.is_cuda else 1
        part, counts = ops.out, ops.out
        if most > 1:
            part = torch.empty(most, m, n, dtype=torch.float32, device=xc.device)
            counts = _tile_counters(xc.device, triton.cdiv(m, 16) * triton.cdiv(n, 16))  # tl.dot tiles: 16 and up
        r_s, *rest = epi_args
        args = (xc, words, ops.out, part, counts, r_s, gsb, *rest, m, n, k, words.shape[0], words.shape[1],
                m_bucket(m), *_epilogue_scalars(ops))
        _launch(_w1a16_frag_tuned, fragment_kernels.w1a16_frag_kernel, args, consts, m, n, k, config, splits_k=True)
        return _finish(x, ops.out, n, after)
    cs = _or(weight.col_scale, weight.row_scale)
    r_s, *rest = epi_args
    args = (xc, kmajor_signs(weight), ops.out, r_s, cs, gsb, *rest, m, n, k, m_bucket(m), *_epilogue_scalars(ops))
    _launch(_w1a16_tuned, kernels.w1a16_kernel, args, {**consts, "HAS_COL": weight.col_scale is not None}, m, n, k,
            config)
    return _finish(x, ops.out, n, after)


# (device, stream) -> int32 counters, one per output tile, that split-K launches count their finished shares
# in. Each launch leaves them zero again, and launches on one stream run one after another, so a stream's
# launches can share one set. Outgrown sets are kept: a captured CUDA graph may still point at them. The
# sets stay few: torch.cuda.Stream() hands out streams from a fixed pool per device.
_counters: dict[tuple, list[torch.Tensor]] = {}
_COUNTERS = 4096  # a set's size: 16-row products up to 65536 columns wide in the narrowest tiles


def _tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    sets = _counters.setdefault((device, stream), [])
    if not sets or sets[-1].numel() < tiles:
        sets.append(torch.zeros(max(tiles, _COUNTERS), dtype=torch.int32, device=device))
    return sets[-1]


def quantize_warps(block: int) -> int:
    """Warps for quantize_rows_kernel's one row of `block` columns (a power of two): 1024 columns a warp, at most 8
    warps. On an H100 that was as fast or up to 11% faster than 512 a warp (at most 16) at 1024-4096 rows of
    bonsai-4b's widths (3072, 12288), and fewer warps were slower (benchmarks/bench_quant.py, RESULTS.md)."""
    return min(8, max(1, block // 1024))


def quantize_rows(x2: torch.Tensor, col_scale: torch.Tensor | None, xsum: torch.Tensor | None = None,
                  prologue: Prologue | None = None, rows_per_sample: int = 1,
                  xn: torch.Tensor | None = None, fp8: bool = False) -> tuple[torch.Tensor, ...]:
    """x2 [M, K] -> (q int8 [M, K], scale f32 [M], row sums of q int32 [M]); col_scale f32 [K] folded in
    first. With a prologue (fusion.py; its shift / scale rows [B, K] for rows_per_sample rows each) x2's
    rows go through it before anything else. With `xsum` (float32 [M]) the row sums of x2 (after the
    prologue, before col_scale) are written there as well, and with `xn` ([M, K]) the rows themselves.
    fp8: q is float8 e4m3 (scale = max |row| / 448) and the row sums of q are None."""
    m, k = x2.shape
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn if fp8 else torch.int8, device=x2.device)
    scale = torch.empty(m, dtype=torch.float32, device=x2.device)
    qsum = None if fp8 else torch.empty(m, dtype=torch.int32, device=x2.device)
    pro = prologue or Prologue(0.0)
    ln_weight, ln_bias, shift, mod_scale = (None if t is None else t.contiguous()
                                            for t in (pro.weight, pro.bias, pro.shift, pro.scale))
    block = triton.next_power_of_2(k)
    kernels.quantize_rows_kernel[(m,)](
        x2, _or(col_scale, scale), q, scale, _or(qsum, scale), _or(xsum, scale), _or(ln_weight, scale),
        _or(ln_bias, scale), _or(shift, scale), _or(mod_scale, scale), _or(xn, scale), k, rows_per_sample, pro.eps,
        HAS_COL=col_scale is not None, HAS_XSUM=xsum is not None, NORM=prologue is not None,
        LN_WEIGHT=ln_weight is not None, LN_BIAS=ln_bias is not None, MODULATE=shift is not None,
        STORE_XN=xn is not None, FP8=fp8, BLOCK=block, num_warps=quantize_warps(block))
    return q, scale, qsum


def w1a8_supports_group(group_size: int) -> bool:
    return group_size == 0 or group_size % 32 == 0


def _check_fp8(x: torch.Tensor, weight: PackedWeight, variant: str) -> None:
    if variant != "fragment" or not fragment_supports_group(weight.group_size, INT8_CHUNK):
        raise ValueError(f"triton-w1a8-fp8 runs on the fragment kernel, for group sizes 0 or multiples of {INT8_CHUNK} "
                         f"(got variant {variant!r}, group_size {weight.group_size}); use triton-w1a8")
    if x.is_cuda:
        raise RuntimeError("W1A8 on float8 activations does not run on CUDA: Triton 3.6 compiles it wrong for most "
                           "of its tiles (benchmarks/RESULTS.md); use int8 activations (triton-w1a8)")


def w1a8(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None,
         prologue: Prologue | None = None, epilogue: Epilogue | None = None,
         config: TileConfig | None = None, variant: str | None = None, activation: str = "int8") -> torch.Tensor:
    """y = epilogue(prologue(x) @ W.T (+ bias)) with prologue(x) quantized per token to int8 or float8
    e4m3 (col_scale folded in); returns x.dtype. The epilogue may have the parts of W1A8_FUSES (GELU, head norms, residual +
    gate).

    variant: one of VARIANTS (default DEFAULT_VARIANT); "ws" falls back to "fragment" where it does not
    apply (ws.supports, fp8; and at M <= SMALL_M), "fragment" to "k-major" for group sizes that are
    not a multiple of 128. activation: "int8" or "fp8" (float8 e4m3 per token,
    fragment kernel only; see ACTIVATIONS)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown W1A8 activation format {activation!r}; choose from {ACTIVATIONS}")
    fp8 = activation == "fp8"
    if fp8:
        _check_fp8(x, weight, _variant(variant, 0))  # fp8 has no "ws" kernel: "auto" is "fragment" there
    if not w1a8_supports_group(weight.group_size):
        raise ValueError(f"triton-w1a8 needs group_size 0 or a multiple of 32, got {weight.group_size}; "
                         "use triton-w1a16")
    _check_share("triton-w1a8", W1A8_FUSES, prologue, epilogue)
    epilogue, after = _kernel_share(epilogue, W1A8_FUSES)
    ops = _operands(x, weight, bias, row_sums=False, lowrank=prologue is None)
    ops = _with_epilogue(ops, x, weight.out_features, prologue, epilogue)
    layout = layout_of(weight)
    m, k = ops.x2.shape
    n = weight.out_features
    # The low-rank term multiplies the prologue's output: the quantization kernel writes it out for that.
    xn = None
    if prologue is not None and layout.lowrank_v is not None:
        xn = torch.empty(m, k, dtype=torch.bfloat16, device=x.device)
    q, xs, qsum = quantize_rows(ops.x2, weight.col_scale, ops.xsum, prologue, ops.rows_per_sample, xn, fp8)
    if xn is not None:
        ops = replace(ops, xv=xn @ layout.lowrank_v.t())
    gs = _or(layout.group_scale_t, weight.row_scale)
    r_s, *rest = _epilogue_args(weight, ops)
    consts = {"GROUP": weight.group_size, **_epilogue_consts(weight, ops)}
    auto, variant = (variant or DEFAULT_VARIANT) == "auto", _variant(variant, m)
    if variant in ("fragment", "ws") and fragment_supports_group(weight.group_size, INT8_CHUNK):
        words = weight.prepared("triton-fragment-int8", int8_words)  # fp8 reads the same words
        if (variant == "ws" and not fp8 and m > SMALL_M and ws.supports(q, weight, ops.head_dim, consts["RANK"])
                and _ws_ran(lambda: ws.w1a8(q, xs, qsum, words, ops.out, (r_s, *rest), _epilogue_scalars(ops), consts,
                                            _ws_tile(config, INT8_CHUNK)), auto)):
            return _finish(x, ops.out, n, after)
        args = (q, xs, _or(qsum, xs), words, ops.out, r_s, gs, *rest, m, n, k, words.shape[0], words.shape[1],
                m_bucket(m), *_epilogue_scalars(ops))
        _launch(_w1a8_frag_tuned, fragment_kernels.w1a8_frag_kernel, args, {**consts, "FP8": fp8}, m, n, k,
                _fragment_config(config, INT8_CHUNK))
        return _finish(x, ops.out, n, after)
    args = (q, xs, qsum, kmajor_signs(weight), ops.out, r_s, gs, *rest, m, n, k, m_bucket(m), *_epilogue_scalars(ops))
    _launch(_w1a8_tuned, kernels.w1a8_kernel, args, consts, m, n, k, config)
    return _finish(x, ops.out, n, after)
